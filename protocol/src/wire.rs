//! The MQTT contract, version 1 (DESIGN.md "The MQTT contract (v1)"): topics and the JSON payloads.
//!
//! This module is the contract in code. `docs/asyncapi.yaml` and `docs/schemas/*.schema.json` are the same
//! contract for people and for other languages, and the gateway's `wire_schema` tests check payloads built
//! here against those schemas, so the two cannot drift apart.
//!
//! | topic ([`Topics`]) | direction | QoS / retain | payload |
//! |---|---|---|---|
//! | `{root}/readings` | gateway → CRM | 1 / no | [`ReadingMessage`] (`phg.reading/1`) |
//! | `{root}/events` | gateway → CRM | 1 / no | [`EventMessage`] (`phg.event/1`) |
//! | `{root}/status` | gateway → CRM | 1 / retained, also the last will | [`StatusMessage`] (`phg.status/1`) |
//! | `{root}/alerts` | gateway → CRM | 1 / no | reserved for the alerts issue |
//! | `{root}/config` | CRM → gateway | 1 / retained | reserved for the configuration issue |
//! | `{root}/symptoms` | gateway → CRM | 1 / no | [`SymptomsMessage`] (`phg.symptoms/1`) |
//!
//! The root is configurable and defaults to `phg/v1/{gateway_id}` ([`Topics::default_root`]). Every payload
//! is one JSON object with a `schema` field naming its type and major version; MQTT 5 publishes also carry
//! the content type [`CONTENT_TYPE`].
//!
//! # Versioning and forward compatibility
//!
//! Within a major version (`…/1`) fields are only *added*, never removed, renamed or given another meaning.
//! So none of the types here use `#[serde(deny_unknown_fields)]`: a consumer built against an older minor
//! revision reads a newer gateway's payloads and ignores the fields it does not know, and the JSON Schemas
//! say `additionalProperties: true` for the same reason. Optional fields are omitted when absent, never
//! sent as `null`. Enumerated values (units, kinds, qualities, event types) are fixed for version 1; the
//! free-form lists ([`ReadingStatus::flags`]) may gain names, and consumers must ignore names they do not
//! know. A breaking change is a new major version: `phg.reading/2` on a `phg/v2/…` topic root.
//!
//! # Privacy (DESIGN.md promise 8)
//!
//! No payload carries a name, a national id, a date of birth or any other direct identifier. A patient is
//! a **pseudonymous id** issued by the CRM ([`is_valid_pseudonym`] enforces its shape, which leaves no room
//! for a name with a space in it); a device is its Bluetooth address or System ID. Event payloads may carry
//! the hex of an undecodable characteristic value ([`Event::DecodeFailed`]): that has no patient identity in
//! it but it does contain measurement values, so events travel only over the same TLS connection as
//! readings.

use alloc::borrow::ToOwned;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::gatt::time::DateTime;
use crate::model::{GlucoseContextInfo, GlucoseUnit, Measurement, PressureUnit, RecordNumbering};
use crate::reading_id::{self, BpIdentity, GlucoseTimeIdentity};
use crate::rules::{Symptom, Symptoms};
use crate::validate::{
    Censor, Field, Outcome, PULSE_PRESSURE_MIN_MMHG, Reception, Rejection, TimeDoubt, TimeVerdict,
    Verdict,
};

/// The MQTT 5 `content-type` of every payload.
pub const CONTENT_TYPE: &str = "application/json";
/// The `schema` of a [`ReadingMessage`].
pub const READING_SCHEMA: &str = "phg.reading/1";
/// The `schema` of an [`EventMessage`].
pub const EVENT_SCHEMA: &str = "phg.event/1";
/// The `schema` of a [`StatusMessage`].
pub const STATUS_SCHEMA: &str = "phg.status/1";
/// The `schema` of an [`AlertMessage`] (`…/alerts`).
pub const ALERT_SCHEMA: &str = "phg.alert/1";
/// The `schema` of a [`ConfigMessage`] (`…/config`, CRM → gateway). Version 2 added `cards` (the
/// kiosk's card → patient map); a gateway of version 2 still reads [`CONFIG_SCHEMA_V1`].
pub const CONFIG_SCHEMA: &str = "phg.config/2";
/// The first `schema` of a [`ConfigMessage`]: no `cards`.
pub const CONFIG_SCHEMA_V1: &str = "phg.config/1";
/// The `schema` of a [`SymptomsMessage`] (`…/symptoms`).
pub const SYMPTOMS_SCHEMA: &str = "phg.symptoms/1";
/// The default topic prefix; the gateway id follows it ([`Topics::default_root`]).
pub const DEFAULT_TOPIC_PREFIX: &str = "phg/v1";
/// The longest pseudonymous patient id accepted ([`is_valid_pseudonym`]).
pub const MAX_PSEUDONYM_LEN: usize = 128;

// ---------------------------------------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------------------------------------

/// One of the contract's topics, with its delivery rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `{root}/readings`: one accepted reading per message.
    Readings,
    /// `{root}/events`: what went wrong or needs a person (rejected readings, unattributed readings, …).
    Events,
    /// `{root}/status`: the gateway's state; retained, and the last will.
    Status,
    /// `{root}/alerts`: edge alerts (payload reserved for the alerts issue).
    Alerts,
    /// `{root}/config`: the CRM's configuration for this gateway (payload reserved for its issue).
    Config,
    /// `{root}/symptoms`: a patient's answer to the symptom question a reading's result asked.
    Symptoms,
}

impl Channel {
    /// Every channel, in the contract's order.
    pub const ALL: [Channel; 6] = [
        Channel::Readings,
        Channel::Events,
        Channel::Status,
        Channel::Alerts,
        Channel::Config,
        Channel::Symptoms,
    ];

    /// The last topic level.
    pub fn suffix(&self) -> &'static str {
        match self {
            Channel::Readings => "readings",
            Channel::Events => "events",
            Channel::Status => "status",
            Channel::Alerts => "alerts",
            Channel::Config => "config",
            Channel::Symptoms => "symptoms",
        }
    }

    /// The MQTT QoS: 1 (at least once) everywhere; duplicates are harmless by the reading ids.
    pub fn qos(&self) -> u8 {
        1
    }

    /// `true` for the retained topics: status (the last will too) and config.
    pub fn retained(&self) -> bool {
        matches!(self, Channel::Status | Channel::Config)
    }

    /// `true` when the gateway publishes on it, `false` when it subscribes (config).
    pub fn gateway_publishes(&self) -> bool {
        !matches!(self, Channel::Config)
    }
}

/// `true` when `s` can be one MQTT topic level: not empty, and no `/`, `+`, `#` or NUL (a gateway id
/// becomes a level of every topic).
pub fn is_valid_topic_level(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

/// The topic names under one root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topics {
    root: String,
}

impl Topics {
    /// Topics under `root` (a trailing `/` is dropped).
    pub fn new(root: &str) -> Topics {
        Topics {
            root: root.trim_end_matches('/').to_owned(),
        }
    }

    /// The default root for a gateway: `phg/v1/{gateway_id}`.
    pub fn default_root(gateway_id: &str) -> String {
        format!("{DEFAULT_TOPIC_PREFIX}/{gateway_id}")
    }

    /// Topics under the default root for a gateway.
    pub fn for_gateway(gateway_id: &str) -> Topics {
        Topics {
            root: Topics::default_root(gateway_id),
        }
    }

    /// The root.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The topic of `channel`.
    pub fn topic(&self, channel: Channel) -> String {
        format!("{}/{}", self.root, channel.suffix())
    }

    /// `{root}/readings`.
    pub fn readings(&self) -> String {
        self.topic(Channel::Readings)
    }

    /// `{root}/events`.
    pub fn events(&self) -> String {
        self.topic(Channel::Events)
    }

    /// `{root}/status`.
    pub fn status(&self) -> String {
        self.topic(Channel::Status)
    }

    /// `{root}/alerts`.
    pub fn alerts(&self) -> String {
        self.topic(Channel::Alerts)
    }

    /// `{root}/config`.
    pub fn config(&self) -> String {
        self.topic(Channel::Config)
    }

    /// `{root}/symptoms`.
    pub fn symptoms(&self) -> String {
        self.topic(Channel::Symptoms)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------------------

/// `secs` since the Unix epoch as an RFC 3339 UTC time, `2024-06-15T17:17:27Z`; `None` outside the years
/// 1582..=9999.
pub fn rfc3339_utc(secs: i64) -> Option<String> {
    DateTime::from_epoch_seconds(secs).map(|t| format!("{t}Z"))
}

/// Seconds since the Unix epoch for `YYYY-MM-DDTHH:MM:SS[.fff]Z` (the form [`rfc3339_utc`] writes);
/// `None` for anything else.
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || b.get(13) != Some(&b':') {
        return None;
    }
    let num = |r: core::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = s.get(19..)?;
    let rest = match rest.strip_prefix('.') {
        Some(frac) => frac.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => rest,
    };
    if !(rest == "Z" || rest == "z" || rest == "+00:00") {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// `true` for a well-formed pseudonymous patient id. The documented rule (DESIGN.md promise 8), every part
/// of which must hold:
///
/// 1. 1..=[`MAX_PSEUDONYM_LEN`] characters of ASCII letters, digits, `.`, `_`, `:` and `-`, starting with a
///    letter or digit — so a name with a space (`Jane Doe`) or an e-mail address does not fit;
/// 2. at least one ASCII letter **and** at least one digit — a bare name (`JohnSmith`, `john.smith`,
///    `Mueller`) has no digit, a bare number (a phone or account number) has no letter; the CRM's
///    pseudonyms carry both (`P-000123`, `p-home-0001`, a UUID, `clinic7:4711`);
/// 3. it holds no national id number: no US Social Security number (`123-45-6789` anywhere, or
///    `123456789` as the whole id or a part of it between separators `.`, `_`, `:`, `-`), no Chinese
///    resident id (a run of 17 digits and a check digit or `X`, anywhere), no UK National Insurance number
///    (`AB123456C`, as the whole id or a part).
///
/// A shape check cannot prove an id is a pseudonym; it refuses the mistakes a person typing an id would
/// make (a name, a national id), and the CRM must never issue anything else.
pub fn is_valid_pseudonym(s: &str) -> bool {
    let b = s.as_bytes();
    let well_formed = !b.is_empty()
        && b.len() <= MAX_PSEUDONYM_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'));
    well_formed
        && b.iter().any(u8::is_ascii_alphabetic)
        && b.iter().any(u8::is_ascii_digit)
        && !contains_national_id(b)
        && !b
            .split(|c| matches!(c, b'.' | b'_' | b':' | b'-'))
            .any(looks_like_national_id)
}

/// The shapes of national id numbers [`is_valid_pseudonym`] refuses (rule 3), on one part of an id.
fn looks_like_national_id(b: &[u8]) -> bool {
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    // US SSN without its dashes (with them it is found by `contains_national_id`).
    let ssn = b.len() == 9 && digits(b);
    // UK National Insurance number: two letters, six digits, a suffix letter A-D.
    let nino = b.len() == 9
        && b[..2].iter().all(u8::is_ascii_alphabetic)
        && digits(&b[2..8])
        && matches!(b[8].to_ascii_uppercase(), b'A'..=b'D');
    ssn || nino
}

/// Rule 3 anywhere in an id, not only as a whole part: a US SSN with its dashes (`AAA-GG-SSSS`) and a
/// Chinese resident id (GB 11643-1999: 17 digits and a check character 0-9 or X), each bounded by
/// non-digits.
fn contains_national_id(b: &[u8]) -> bool {
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    (0..b.len()).any(|i| {
        if i > 0 && digit(i - 1) {
            return false;
        }
        let run = (i..b.len()).take_while(|&j| digit(j)).count();
        let after = b.get(i + run).copied();
        let cn = run == 18 || (run == 17 && matches!(after, Some(b'X' | b'x')));
        let ssn = run == 3
            && after == Some(b'-')
            && (i + 4..i + 6).all(digit)
            && b.get(i + 6) == Some(&b'-')
            && (i + 7..i + 11).all(digit)
            && !digit(i + 11);
        cn || ssn
    })
}

/// Lower-case hex of `bytes`, no separators (`gateway decode` reads it back).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0F)]));
    }
    s
}

/// What kind of device a reading or a device entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A glucometer (Glucose Service).
    Glucose,
    /// A blood-pressure cuff (Blood Pressure Service).
    BloodPressure,
}

impl Kind {
    /// The kind of a measurement.
    pub fn of(m: &Measurement) -> Kind {
        match m {
            Measurement::Glucose(_) => Kind::Glucose,
            Measurement::BloodPressure(_) => Kind::BloodPressure,
        }
    }
}

/// The deterministic id of a measurement from the device `device_id` (DESIGN.md promise 3):
/// [`reading_id::glucose`] over the sequence number (or, for a meter that numbers newest-first,
/// [`reading_id::glucose_by_time`] over its time and value), [`reading_id::blood_pressure`] over the time
/// stamp, user and values as transmitted.
pub fn reading_id_of(device_id: &str, m: &Measurement) -> Uuid {
    match m {
        Measurement::Glucose(g) if g.numbering == RecordNumbering::NewestFirst => {
            reading_id::glucose_by_time(
                device_id,
                &GlucoseTimeIdentity {
                    base_time: g.base_time,
                    time_offset_min: g.time_offset_min,
                    concentration: g.concentration.map(|c| c.raw),
                    mol_per_l: g
                        .concentration
                        .is_some_and(|c| c.unit == GlucoseUnit::MmolPerL),
                    type_and_location: match (g.sample_type, g.sample_location) {
                        (Some(t), Some(l)) => Some((t & 0x0F) | (l << 4)),
                        _ => None,
                    },
                },
            )
        }
        Measurement::Glucose(g) => reading_id::glucose(device_id, g.sequence_number),
        Measurement::BloodPressure(b) => reading_id::blood_pressure(
            device_id,
            &BpIdentity {
                timestamp: b.timestamp,
                user_id: b.user_id,
                kpa: b.systolic.unit == PressureUnit::KPa,
                systolic: b.systolic.raw,
                diastolic: b.diastolic.raw,
                mean_arterial_pressure: b.mean_arterial_pressure.raw,
                pulse_rate: b.pulse_rate,
            },
        ),
    }
}

/// Why a payload could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The verdict keeps the reading out of the patient's record (control solution or rejected): it goes
    /// to the events topic ([`Event::for_excluded`]), never to readings.
    NotAPatientReading {
        /// The outcome's code (`control_solution`, `rejected`).
        outcome: &'static str,
    },
    /// A patient reading without its value (the verdict does not belong to this measurement).
    NoValue,
    /// A time that RFC 3339 cannot carry (outside the years 1582..=9999).
    TimeOutOfRange {
        /// Seconds since the Unix epoch.
        seconds: i64,
    },
    /// The patient id is not a pseudonym ([`is_valid_pseudonym`]).
    InvalidPatientId,
    /// A reading id that is not a version 5 UUID (every reading id is one, [`reading_id_of`]).
    InvalidReadingId,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::NotAPatientReading { outcome } => {
                write!(
                    f,
                    "a {outcome} reading is not published as a reading (it is reported as an event)"
                )
            }
            WireError::NoValue => f.write_str("patient reading has no value"),
            WireError::TimeOutOfRange { seconds } => {
                write!(f, "time {seconds} s is outside RFC 3339's years")
            }
            WireError::InvalidPatientId => f.write_str("patient id is not a pseudonymous id"),
            WireError::InvalidReadingId => f.write_str("reading id is not a version 5 UUID"),
        }
    }
}

impl core::error::Error for WireError {}

fn time_string(secs: i64) -> Result<String, WireError> {
    rfc3339_utc(secs).ok_or(WireError::TimeOutOfRange { seconds: secs })
}

// ---------------------------------------------------------------------------------------------------------
// Readings
// ---------------------------------------------------------------------------------------------------------

/// One accepted reading, on `{root}/readings` (QoS 1, not retained): schema `phg.reading/1`.
///
/// Only patient readings (valid, low quality, censored) are published here; control-solution tests and
/// rejected readings are events. Unknown fields are ignored on reading (no `deny_unknown_fields`): newer
/// minor revisions may add fields.
///
/// The envelope (schema, id, gateway, patient) is followed by the [`ReadingBody`], flattened: the JSON
/// is one object, `{"schema":…,"id":…,"gateway":…,"patient":…,"device":…,"kind":…,…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadingMessage {
    /// [`READING_SCHEMA`].
    pub schema: String,
    /// The reading id: a version 5 UUID, the same for every download of the same measurement; the CRM
    /// upserts on it.
    pub id: String,
    /// The gateway id.
    pub gateway: String,
    /// The pseudonymous patient id (never a name or national id; see the module docs).
    pub patient: String,
    /// What was measured, when, and the verdict: everything that does not depend on the patient.
    #[serde(flatten)]
    pub body: ReadingBody,
}

/// The patient-independent content of a reading: the device, the values, the times, the status and the
/// verdict. A [`ReadingMessage`] is this plus its envelope; an [`Event::Unattributed`] carries it whole, so
/// the journaled event is the durable copy of a reading held for staff to assign (DESIGN.md promise 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadingBody {
    /// The device that measured.
    pub device: DeviceRef,
    /// Glucose or blood pressure; says which of `glucose` / `blood_pressure` is present.
    pub kind: Kind,
    /// GLS record sequence number (glucose only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_number: Option<u16>,
    /// The glucose value (glucose only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glucose: Option<GlucoseValue>,
    /// The pressures and pulse (blood pressure only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blood_pressure: Option<BloodPressureValue>,
    /// The GLS measurement context, when the meter sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<GlucoseContext>,
    /// Device, receive and corrected time (DESIGN.md promise 5).
    pub time: ReadingTime,
    /// The device's status words and the validation flags.
    pub status: ReadingStatus,
    /// The validation verdict.
    pub quality: Quality,
}

/// The measuring device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceRef {
    /// Stable device identity: the Bluetooth address or the System ID (the same string the reading id is
    /// computed from).
    pub id: String,
    /// Model name (Device Information), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// BLS user id on a multi-user cuff (255 = unknown user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u8>,
}

impl DeviceRef {
    /// A device known by its id alone.
    pub fn new(id: &str) -> DeviceRef {
        DeviceRef {
            id: id.to_owned(),
            model: None,
            user_id: None,
        }
    }
}

/// A glucose value: device-native value and unit as the patient saw them, and both units derived with
/// [`crate::model::MG_PER_DL_PER_MMOL_PER_L`] (unrounded).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GlucoseValue {
    /// The value in the device's unit. For a censored reading it is whatever number the meter sent with
    /// its LO / HI flag (often its range limit), not a measurement, and may be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The device's unit (absent only for a censored record that carried no concentration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<GlucoseUnit>,
    /// The value in mg/dL (present with `value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mg_per_dl: Option<f64>,
    /// The value in mmol/L (present with `value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmol_per_l: Option<f64>,
    /// `low` / `high`: the meter showed LO / HI (outside its measuring range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub censored: Option<Censor>,
    /// GLS sample type code (1 capillary whole blood … 9 interstitial fluid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_type: Option<u8>,
    /// GLS sample location code (1 finger, 2 alternate site, 3 earlobe, 15 not available).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_location: Option<u8>,
}

/// A blood-pressure reading: the pressures in the cuff's unit and in mmHg (derived with
/// [`crate::model::MMHG_PER_KPA`], unrounded).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BloodPressureValue {
    /// The cuff's unit.
    pub unit: PressureUnit,
    /// Systolic, cuff's unit.
    pub systolic: f64,
    /// Diastolic, cuff's unit.
    pub diastolic: f64,
    /// Mean arterial pressure, cuff's unit; absent when not sent (a special value, or 0 as Beurer cuffs
    /// send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_arterial_pressure: Option<f64>,
    /// Systolic, mmHg.
    pub systolic_mmhg: f64,
    /// Diastolic, mmHg.
    pub diastolic_mmhg: f64,
    /// Mean arterial pressure, mmHg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_mmhg: Option<f64>,
    /// Pulse rate, beats per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulse_bpm: Option<f64>,
}

/// The GLS measurement context with its codes named (`reserved:N` for a code the specification reserves,
/// kept rather than dropped: i-SENS meters send meal 6 for a ketone test).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GlucoseContext {
    /// `preprandial`, `postprandial`, `fasting`, `casual`, `bedtime` or `reserved:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meal: Option<String>,
    /// `self`, `health_care_professional`, `lab_test`, `not_available` or `reserved:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tester: Option<String>,
    /// `minor_health_issues`, `major_health_issues`, `during_menses`, `under_stress`, `no_health_issues`,
    /// `not_available` or `reserved:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Carbohydrate intake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carbohydrate: Option<Carbohydrate>,
    /// Exercise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exercise: Option<Exercise>,
    /// Medication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medication: Option<Medication>,
    /// HbA1c, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hba1c_pct: Option<f64>,
}

/// Carbohydrate intake (GLS context).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carbohydrate {
    /// `breakfast`, `lunch`, `dinner`, `snack`, `drink`, `supper`, `brunch` or `reserved:N`.
    pub meal: String,
    /// Grams, if the value is not a special.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grams: Option<f64>,
}

/// Exercise (GLS context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exercise {
    /// Duration in seconds (65535 = overrun, "longer than that").
    pub duration_s: u16,
    /// Intensity, percent.
    pub intensity_pct: u8,
}

/// The unit of a medication amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MedicationUnit {
    /// Milligrams.
    #[serde(rename = "mg")]
    Mg,
    /// Millilitres.
    #[serde(rename = "mL")]
    Ml,
}

/// Medication (GLS context).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Medication {
    /// `rapid_acting_insulin`, `short_acting_insulin`, `intermediate_acting_insulin`,
    /// `long_acting_insulin`, `pre_mixed_insulin` or `reserved:N`.
    pub kind: String,
    /// The amount, if the value is not a special.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<f64>,
    /// The amount's unit.
    pub unit: MedicationUnit,
}

fn code_name(names: &[(u8, &str)], code: u8) -> String {
    match names.iter().find(|(c, _)| *c == code) {
        Some((_, n)) => (*n).to_owned(),
        None => format!("reserved:{code}"),
    }
}

const MEALS: [(u8, &str); 5] = [
    (1, "preprandial"),
    (2, "postprandial"),
    (3, "fasting"),
    (4, "casual"),
    (5, "bedtime"),
];
const TESTERS: [(u8, &str); 4] = [
    (1, "self"),
    (2, "health_care_professional"),
    (3, "lab_test"),
    (15, "not_available"),
];
const HEALTH: [(u8, &str); 6] = [
    (1, "minor_health_issues"),
    (2, "major_health_issues"),
    (3, "during_menses"),
    (4, "under_stress"),
    (5, "no_health_issues"),
    (15, "not_available"),
];
const CARBOHYDRATES: [(u8, &str); 7] = [
    (1, "breakfast"),
    (2, "lunch"),
    (3, "dinner"),
    (4, "snack"),
    (5, "drink"),
    (6, "supper"),
    (7, "brunch"),
];
const MEDICATIONS: [(u8, &str); 5] = [
    (1, "rapid_acting_insulin"),
    (2, "short_acting_insulin"),
    (3, "intermediate_acting_insulin"),
    (4, "long_acting_insulin"),
    (5, "pre_mixed_insulin"),
];

impl From<&GlucoseContextInfo> for GlucoseContext {
    fn from(c: &GlucoseContextInfo) -> GlucoseContext {
        GlucoseContext {
            meal: c.meal.map(|m| code_name(&MEALS, m)),
            tester: c.tester.map(|t| code_name(&TESTERS, t)),
            health: c.health.map(|h| code_name(&HEALTH, h)),
            carbohydrate: c.carbohydrate.map(|(id, grams)| Carbohydrate {
                meal: code_name(&CARBOHYDRATES, id),
                grams,
            }),
            exercise: c.exercise.map(|(duration_s, intensity_pct)| Exercise {
                duration_s,
                intensity_pct,
            }),
            medication: c.medication.map(|(id, amount, litres)| Medication {
                kind: code_name(&MEDICATIONS, id),
                amount,
                unit: if litres {
                    MedicationUnit::Ml
                } else {
                    MedicationUnit::Mg
                },
            }),
            hba1c_pct: c.hba1c_pct,
        }
    }
}

/// A reading's time (DESIGN.md promise 5): the device's own time kept, the gateway's receive time, the
/// clock offset measured at that connection, and the corrected time derived from them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadingTime {
    /// The device's time as it keeps it, `YYYY-MM-DDTHH:MM:SS`, no zone (GLS base time + offset, BLS time
    /// stamp); absent when the device sent none or an incomplete date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// When the gateway received it, RFC 3339 UTC (`…Z`).
    pub received: String,
    /// Device time − clock offset, RFC 3339 UTC: when the measurement happened on the gateway's timeline.
    /// Absent when either is unknown; then use `received` and treat the time as approximate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrected: Option<String>,
    /// Device clock minus gateway clock at this connection, seconds (the device clock read as if UTC, so a
    /// device kept in local time has its zone in it). Absent when the clock was not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_s: Option<i64>,
    /// `true` when `corrected` can be trusted; `false` comes with `doubt`.
    pub trusted: bool,
    /// Why the time cannot be trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doubt: Option<TimeDoubt>,
}

impl ReadingTime {
    /// From the verdict's time and the reception it was validated with.
    ///
    /// # Errors
    /// [`WireError::TimeOutOfRange`] for a time outside the years 1582..=9999.
    pub fn new(t: &TimeVerdict, rx: &Reception) -> Result<ReadingTime, WireError> {
        Ok(ReadingTime {
            device: t.device_time.map(|d| d.to_string()),
            received: time_string(rx.received_utc)?,
            corrected: t.corrected_utc.map(time_string).transpose()?,
            clock_offset_s: rx.clock_offset_s,
            trusted: t.doubt.is_none() && t.corrected_utc.is_some(),
            doubt: t.doubt,
        })
    }
}

/// The device's status words as sent, and the validation's annotations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReadingStatus {
    /// GLS Sensor Status Annunciation, as sent (glucose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor_status: Option<u16>,
    /// BLS Measurement Status, as sent (blood pressure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurement_status: Option<u16>,
    /// Validation flags ([`crate::validate::Flags`] names: `battery_low`, `time_untrusted`,
    /// `irregular_pulse`, …); may be empty. New names may appear in minor revisions.
    #[serde(default)]
    pub flags: Vec<String>,
}

/// The verdict on a published reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// A good reading.
    Valid,
    /// A usable reading the device doubts (body movement, loose cuff, position): exclude from averages,
    /// prompt a repeat, no crisis alert without a clean repeat.
    LowQuality,
    /// A glucose value outside the meter's range (LO / HI; see `glucose.censored`).
    Censored,
}

impl Quality {
    /// The quality of a patient reading; `None` for an outcome that keeps the reading out of the record.
    pub fn of(outcome: &Outcome) -> Option<Quality> {
        match outcome {
            Outcome::Valid => Some(Quality::Valid),
            Outcome::LowQuality => Some(Quality::LowQuality),
            Outcome::Censored { .. } => Some(Quality::Censored),
            Outcome::ControlSolution | Outcome::Rejected { .. } => None,
        }
    }
}

fn outcome_code(o: &Outcome) -> &'static str {
    match o {
        Outcome::Valid => "valid",
        Outcome::LowQuality => "low_quality",
        Outcome::Censored { .. } => "censored",
        Outcome::ControlSolution => "control_solution",
        Outcome::Rejected { .. } => "rejected",
    }
}

impl ReadingBody {
    /// The body for measurement `m` from `device`, validated into `verdict` at reception `rx` (the same
    /// [`Reception`] given to [`crate::validate::validate`]).
    ///
    /// The other unit, the corrected time and the flag names are derived here. For a blood-pressure
    /// reading the record's BLS user id, when sent, replaces `device.user_id`.
    ///
    /// # Errors
    /// [`WireError::NotAPatientReading`] for a control-solution or rejected verdict (report it with
    /// [`Event::for_excluded`]); [`WireError::NoValue`] when the verdict does not fit the measurement;
    /// [`WireError::TimeOutOfRange`].
    pub fn new(
        mut device: DeviceRef,
        m: &Measurement,
        verdict: &Verdict,
        rx: &Reception,
    ) -> Result<ReadingBody, WireError> {
        let quality = Quality::of(&verdict.outcome).ok_or(WireError::NotAPatientReading {
            outcome: outcome_code(&verdict.outcome),
        })?;
        let mut status = ReadingStatus {
            flags: verdict.flags.names().map(str::to_owned).collect(),
            ..ReadingStatus::default()
        };
        let (mut sequence_number, mut glucose, mut blood_pressure, mut context) =
            (None, None, None, None);
        match m {
            Measurement::Glucose(g) => {
                let censored = match verdict.outcome {
                    Outcome::Censored { censor } => Some(censor),
                    _ => None,
                };
                let value = g.concentration.and_then(|c| c.native());
                if value.is_none() && censored.is_none() {
                    return Err(WireError::NoValue);
                }
                glucose = Some(GlucoseValue {
                    value,
                    unit: g.concentration.map(|c| c.unit),
                    mg_per_dl: g.concentration.and_then(|c| c.mg_per_dl()),
                    mmol_per_l: g.concentration.and_then(|c| c.mmol_per_l()),
                    censored,
                    sample_type: g.sample_type,
                    sample_location: g.sample_location,
                });
                // A newest-first meter's sequence number names nothing outside one transfer: not sent.
                sequence_number =
                    (g.numbering == RecordNumbering::Gls).then_some(g.sequence_number);
                context = g.context.as_ref().map(GlucoseContext::from);
                status.sensor_status = g.sensor_status;
            }
            Measurement::BloodPressure(b) => {
                let (Some(systolic), Some(diastolic), Some(systolic_mmhg), Some(diastolic_mmhg)) = (
                    b.systolic.native(),
                    b.diastolic.native(),
                    b.systolic.mmhg(),
                    b.diastolic.mmhg(),
                ) else {
                    return Err(WireError::NoValue);
                };
                // MAP 0 is "not provided" (Beurer), as validation reads it.
                let map_sent = b
                    .mean_arterial_pressure
                    .native()
                    .filter(|v| *v != 0.0)
                    .is_some();
                blood_pressure = Some(BloodPressureValue {
                    unit: b.systolic.unit,
                    systolic,
                    diastolic,
                    mean_arterial_pressure: b.mean_arterial_pressure.native().filter(|_| map_sent),
                    systolic_mmhg,
                    diastolic_mmhg,
                    map_mmhg: b.mean_arterial_pressure.mmhg().filter(|_| map_sent),
                    pulse_bpm: b.pulse_rate.and_then(|p| p.value()),
                });
                if b.user_id.is_some() {
                    device.user_id = b.user_id;
                }
                status.measurement_status = b.measurement_status;
            }
        }
        Ok(ReadingBody {
            device,
            kind: Kind::of(m),
            sequence_number,
            glucose,
            blood_pressure,
            context,
            time: ReadingTime::new(&verdict.time, rx)?,
            status,
            quality,
        })
    }
}

impl ReadingMessage {
    /// The message for measurement `m` from `device`, validated into `verdict` at reception `rx` (the same
    /// [`Reception`] given to [`crate::validate::validate`]), for the patient `patient` on `gateway`.
    ///
    /// The id is [`reading_id_of`]; the body is [`ReadingBody::new`] (for a blood-pressure reading the
    /// record's BLS user id, when sent, replaces `device.user_id`).
    ///
    /// # Errors
    /// [`WireError::NotAPatientReading`] for a control-solution or rejected verdict (report it with
    /// [`Event::for_excluded`]); [`WireError::InvalidPatientId`] when `patient` is not a pseudonym;
    /// [`WireError::NoValue`] when the verdict does not fit the measurement; [`WireError::TimeOutOfRange`].
    pub fn new(
        gateway: &str,
        patient: &str,
        device: DeviceRef,
        m: &Measurement,
        verdict: &Verdict,
        rx: &Reception,
    ) -> Result<ReadingMessage, WireError> {
        let id = reading_id_of(&device.id, m).to_string();
        let body = ReadingBody::new(device, m, verdict, rx)?;
        if !is_valid_pseudonym(patient) {
            return Err(WireError::InvalidPatientId);
        }
        Ok(ReadingMessage {
            schema: READING_SCHEMA.to_owned(),
            id,
            gateway: gateway.to_owned(),
            patient: patient.to_owned(),
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------------------

/// Something that went wrong or needs a person, on `{root}/events` (QoS 1, not retained): schema
/// `phg.event/1`. Unknown fields are ignored on reading (no `deny_unknown_fields`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// [`EVENT_SCHEMA`].
    pub schema: String,
    /// The gateway id.
    pub gateway: String,
    /// When it happened, RFC 3339 UTC.
    pub time: String,
    /// What happened; its `type` names the variant.
    pub event: Event,
}

impl EventMessage {
    /// `event` on `gateway` at `time_utc` (seconds since the Unix epoch).
    ///
    /// # Errors
    /// [`WireError::TimeOutOfRange`] for a time outside the years 1582..=9999.
    pub fn new(gateway: &str, time_utc: i64, event: Event) -> Result<EventMessage, WireError> {
        Ok(EventMessage {
            schema: EVENT_SCHEMA.to_owned(),
            gateway: gateway.to_owned(),
            time: time_string(time_utc)?,
            event,
        })
    }
}

/// One event, tagged by `type` (snake_case variant names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A reading failed validation: kept in the journal for device QA, never forwarded as a value.
    ReadingRejected {
        /// Its reading id.
        reading_id: String,
        /// The device id.
        device: String,
        /// The pseudonymous patient, when the reading was attributed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patient: Option<String>,
        /// Glucose or blood pressure.
        kind: Kind,
        /// Why, for people (the [`Rejection`]'s text).
        reason: String,
        /// Why, for machines: `no_concentration`, `no_value`, `device_error`, `out_of_range`,
        /// `systolic_not_above_diastolic`, `pulse_pressure_too_narrow`,
        /// `mean_arterial_pressure_outside_range`, `time_in_future` or `not_glucose` (an i-SENS ketone result).
        reason_code: String,
        /// The numbers behind the reason.
        detail: RejectionDetail,
    },
    /// A control-solution test (a meter check, not a patient reading): excluded from the patient's record.
    ControlSolution {
        /// Its reading id.
        reading_id: String,
        /// The device id.
        device: String,
    },
    /// A reading that no patient could be given (a kiosk reading with nobody checked in, an unbound BLS
    /// user): held for staff to assign — never dropped, never guessed (promise 6). The event carries the
    /// whole reading (`reading`), so the journaled event is its durable copy: once a patient is assigned it
    /// becomes a [`ReadingMessage`] with this `reading_id` as its `id` and `reading` as its body.
    Unattributed {
        /// Its reading id (it will be published under this id once assigned).
        reading_id: String,
        /// The device id (`reading.device.id`).
        device: String,
        /// The BLS user id the cuff reported.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<u8>,
        /// Glucose or blood pressure (`reading.kind`).
        kind: Kind,
        /// The reading held: values, times, status and verdict, as a reading message would carry them
        /// (boxed: it is much larger than the other events; the JSON is the same).
        reading: Box<ReadingBody>,
    },
    /// The journal is full: the gateway stopped downloading; the devices keep their records (promise 4)
    /// and are read again once the broker has taken the backlog.
    JournalFull {
        /// Readings held.
        depth: u64,
        /// The journal's bound.
        max: u64,
        /// The device whose download was stopped, if one was.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    /// A device could not be read.
    DeviceError {
        /// The device id.
        device: String,
        /// Where it failed (`connect`, `discover`, `subscribe`, `read_clock`, `download`, …).
        stage: String,
        /// What failed, for people.
        cause: String,
    },
    /// A device advertising the Glucose or Blood Pressure service that was not paired through the gateway:
    /// never connected (promise 8), reported once so staff can pair it if it should be read. Its
    /// advertised name is not sent: a user can set it, and it may name a person.
    UnpairedDevice {
        /// The device's address.
        device: String,
        /// The health services it advertises: `glucose`, `blood_pressure`.
        services: Vec<String>,
        /// Signal strength when first seen, dBm.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rssi: Option<i16>,
    },
    /// A configuration from the CRM was invalid and was not applied; the previous one stays.
    ConfigRejected {
        /// The rejected configuration's version, if it had a readable one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        /// Why, for people.
        reason: String,
    },
    /// A characteristic value could not be decoded (promise 7: reported, and the rest keeps working).
    DecodeFailed {
        /// The device id.
        device: String,
        /// The characteristic's 16-bit UUID as four upper-case hex digits (`2A18`).
        characteristic: String,
        /// The value as received, lower-case hex (`gateway decode` reads it). No patient identity, but it
        /// does contain measurement values.
        hex: String,
        /// The decoder's error.
        error: String,
    },
    /// Staff assigned a held (unattributed) kiosk reading to a patient: the audit record. The reading
    /// itself is published on `…/readings` under its original `reading_id` at the same time.
    ReadingAssigned {
        /// The reading's id (the id of the reading message published with it).
        reading_id: String,
        /// The device id.
        device: String,
        /// Glucose or blood pressure.
        kind: Kind,
        /// What it was before: `unattributed`.
        from: String,
        /// Why it had been held: `no_session`, `outside_session`, `replayed_memory`.
        held_reason: String,
        /// The pseudonymous patient it now belongs to.
        patient: String,
        /// The id of the staff token used (never a person's name).
        staff: String,
    },
    /// Staff discarded a held (unattributed) kiosk reading (a test, a demonstration): it is not a
    /// patient's and is not published as a reading.
    ReadingDiscarded {
        /// The reading's id.
        reading_id: String,
        /// The device id.
        device: String,
        /// Glucose or blood pressure.
        kind: Kind,
        /// Why it had been held: `no_session`, `outside_session`, `replayed_memory`.
        held_reason: String,
        /// Why staff discarded it, in their words.
        reason: String,
        /// The id of the staff token used (never a person's name).
        staff: String,
    },
}

/// The numbers behind a [`Rejection`]; each is present when the reason has it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RejectionDetail {
    /// The value concerned (`glucose`, `systolic`, `diastolic`, `mean_arterial_pressure`, `pulse`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<Field>,
    /// The value found (for `out_of_range`, in the unit of the window; for `pulse_pressure_too_narrow`, the
    /// pulse pressure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The accepted minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The accepted maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The unit of `value`, `min` and `max` (`mg/dL`, `mmol/L`, `mmHg`, `bpm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The IEEE 11073 special value the device sent (`NaN`, `NRes`, `+INF`, `-INF`, `reserved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub special: Option<String>,
    /// The GLS device-error status bits that were set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_bits: Option<u16>,
    /// How far in the future the corrected time was, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_ahead: Option<i64>,
}

/// The machine-readable code of a rejection (the `reason` tag of [`Rejection`]'s serde form).
pub fn rejection_code(r: &Rejection) -> &'static str {
    match r {
        Rejection::NoConcentration => "no_concentration",
        Rejection::NoValue { .. } => "no_value",
        Rejection::DeviceError { .. } => "device_error",
        Rejection::OutOfRange { .. } => "out_of_range",
        Rejection::SystolicNotAboveDiastolic => "systolic_not_above_diastolic",
        Rejection::PulsePressureTooNarrow { .. } => "pulse_pressure_too_narrow",
        Rejection::MeanArterialPressureOutsideRange => "mean_arterial_pressure_outside_range",
        Rejection::TimeInFuture { .. } => "time_in_future",
        Rejection::NotGlucose => "not_glucose",
    }
}

impl RejectionDetail {
    /// The detail of `r` for measurement `m` (which gives glucose values their unit).
    pub fn of(r: &Rejection, m: &Measurement) -> RejectionDetail {
        let unit_of = |field: Field| match (field, m) {
            (Field::Glucose, Measurement::Glucose(g)) => {
                g.concentration.map(|c| c.unit.symbol().to_owned())
            }
            (Field::Glucose, Measurement::BloodPressure(_)) => None,
            (Field::Pulse, _) => Some("bpm".to_owned()),
            _ => Some("mmHg".to_owned()),
        };
        match *r {
            Rejection::NoConcentration
            | Rejection::SystolicNotAboveDiastolic
            | Rejection::MeanArterialPressureOutsideRange
            | Rejection::NotGlucose => RejectionDetail::default(),
            Rejection::NoValue { field, special } => RejectionDetail {
                field: Some(field),
                special: Some(special.to_owned()),
                ..Default::default()
            },
            Rejection::DeviceError { bits } => RejectionDetail {
                status_bits: Some(bits),
                ..Default::default()
            },
            Rejection::OutOfRange {
                field,
                value,
                min,
                max,
            } => RejectionDetail {
                field: Some(field),
                value: Some(value),
                min: Some(min),
                max: Some(max),
                unit: unit_of(field),
                ..Default::default()
            },
            Rejection::PulsePressureTooNarrow { mmhg } => RejectionDetail {
                value: Some(mmhg),
                min: Some(PULSE_PRESSURE_MIN_MMHG),
                unit: Some("mmHg".to_owned()),
                ..Default::default()
            },
            Rejection::TimeInFuture { seconds } => RejectionDetail {
                seconds_ahead: Some(seconds),
                ..Default::default()
            },
        }
    }
}

impl Event {
    /// The event for a measurement the verdict keeps out of the patient's record: [`Event::ControlSolution`]
    /// or [`Event::ReadingRejected`]; `None` for a patient reading (publish a [`ReadingMessage`]).
    pub fn for_excluded(
        device_id: &str,
        patient: Option<&str>,
        m: &Measurement,
        verdict: &Verdict,
    ) -> Option<Event> {
        let reading_id = reading_id_of(device_id, m).to_string();
        match &verdict.outcome {
            Outcome::ControlSolution => Some(Event::ControlSolution {
                reading_id,
                device: device_id.to_owned(),
            }),
            Outcome::Rejected { rejection } => Some(Event::ReadingRejected {
                reading_id,
                device: device_id.to_owned(),
                patient: patient.map(str::to_owned),
                kind: Kind::of(m),
                reason: rejection.to_string(),
                reason_code: rejection_code(rejection).to_owned(),
                detail: RejectionDetail::of(rejection, m),
            }),
            Outcome::Valid | Outcome::LowQuality | Outcome::Censored { .. } => None,
        }
    }

    /// The event for a reading held for staff to assign: measurement `m` from `device`, validated into
    /// `verdict` at reception `rx`, with its whole [`ReadingBody`] (built as [`ReadingMessage::new`] builds
    /// it) and the id the reading will be published under, [`reading_id_of`].
    ///
    /// # Errors
    /// As [`ReadingBody::new`]: [`WireError::NotAPatientReading`] for a control-solution or rejected verdict
    /// (report it with [`Event::for_excluded`]), [`WireError::NoValue`], [`WireError::TimeOutOfRange`].
    pub fn unattributed(
        device: DeviceRef,
        m: &Measurement,
        verdict: &Verdict,
        rx: &Reception,
    ) -> Result<Event, WireError> {
        let reading_id = reading_id_of(&device.id, m).to_string();
        let reading = ReadingBody::new(device, m, verdict, rx)?;
        Ok(Event::Unattributed {
            reading_id,
            device: reading.device.id.clone(),
            user_id: match m {
                Measurement::BloodPressure(b) => b.user_id,
                Measurement::Glucose(_) => None,
            },
            kind: reading.kind,
            reading: Box::new(reading),
        })
    }

    /// The event for a characteristic value (16-bit UUID `uuid`) that did not decode.
    pub fn decode_failed(
        device_id: &str,
        uuid: u16,
        value: &[u8],
        error: &dyn fmt::Display,
    ) -> Event {
        Event::DecodeFailed {
            device: device_id.to_owned(),
            characteristic: format!("{uuid:04X}"),
            hex: to_hex(value),
            error: error.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------------------

/// The gateway's state on `{root}/status` (QoS 1, retained; [`StatusMessage::offline`] is the last will):
/// schema `phg.status/1`. Unknown fields are ignored on reading (no `deny_unknown_fields`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMessage {
    /// [`STATUS_SCHEMA`].
    pub schema: String,
    /// The gateway id.
    pub gateway: String,
    /// Online or offline.
    pub state: GatewayState,
    /// The gateway software's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Readings and events in the journal not yet acknowledged by the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_depth: Option<u64>,
    /// The paired devices (absent when not reported, as in the last will).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceStatus>,
    /// The Bluetooth adapter's state (`powered`, `off`, `absent`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayState {
    /// Connected and running.
    Online,
    /// Gone (the last will, or a clean shutdown).
    Offline,
}

/// One paired device as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device id.
    pub id: String,
    /// Glucometer or cuff.
    pub kind: Kind,
    /// When it was last read successfully, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The last failure reading it, for people (`connect: timeout`); absent when the last attempt worked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

impl StatusMessage {
    /// The retained "online" status, to be filled in with journal depth, devices and adapter state.
    pub fn online(gateway: &str, version: Option<&str>) -> StatusMessage {
        StatusMessage {
            schema: STATUS_SCHEMA.to_owned(),
            gateway: gateway.to_owned(),
            state: GatewayState::Online,
            version: version.map(str::to_owned),
            journal_depth: None,
            devices: Vec::new(),
            adapter: None,
        }
    }

    /// The last will (and the clean-shutdown status): `offline`, nothing else known.
    pub fn offline(gateway: &str) -> StatusMessage {
        StatusMessage {
            state: GatewayState::Offline,
            version: None,
            ..StatusMessage::online(gateway, None)
        }
    }
}

/// An edge alert on `…/alerts`: what the gateway's rule engine decided about one alert (DESIGN.md
/// "Alerts"). Ingest evaluates the same engine authoritatively; the edge copy serves the kiosk and the
/// time the gateway is offline. The alert's `id` is deterministic (`{patient}/{rule_id}/{time}`), so the
/// CRM can match the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertMessage {
    /// [`ALERT_SCHEMA`].
    pub schema: String,
    /// The gateway id.
    pub gateway: String,
    /// When the engine decided, RFC 3339 UTC.
    pub time: String,
    /// The decision: `open`, `escalate`, `confirm`, `downgrade` or `close`, with the alert.
    pub update: crate::rules::AlertAction,
}

impl AlertMessage {
    /// `update` from `gateway` at `time_utc`.
    ///
    /// # Errors
    /// [`WireError::TimeOutOfRange`] for a time outside the years 1582..=9999.
    pub fn new(
        gateway: &str,
        time_utc: i64,
        update: crate::rules::AlertAction,
    ) -> Result<AlertMessage, WireError> {
        Ok(AlertMessage {
            schema: ALERT_SCHEMA.to_owned(),
            gateway: gateway.to_owned(),
            time: time_string(time_utc)?,
            update,
        })
    }
}

/// The gateway's configuration from the CRM, on the retained `…/config` topic: device bindings and the
/// patients' alert settings. Versioned: a gateway applies a version only if it is newer than the one in
/// force, and only whole — an invalid configuration is rejected with a [`Event::ConfigRejected`] and
/// the previous one stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMessage {
    /// [`CONFIG_SCHEMA`].
    pub schema: String,
    /// Increases with every change.
    pub version: u64,
    /// Which device (and cuff user) measures which patient. Replaces the gateway's bindings.
    #[serde(default)]
    pub bindings: Vec<ConfigBinding>,
    /// Per-patient alert settings (profile, overrides with guard-rails).
    #[serde(default)]
    pub patients: Vec<crate::rules::PatientSettings>,
    /// The kiosk's cards (`phg.config/2`): which card checks in which patient. Never a card's UID: its
    /// keyed hash. Replaces the gateway's card map.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cards: Vec<ConfigCard>,
}

/// One kiosk card of a [`ConfigMessage`] (`phg.config/2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCard {
    /// `HMAC-SHA256(card_key, UID)`, 64 lower-case hex digits (`gateway kiosk card-hash` computes it
    /// with the deployment's key); never the UID.
    pub card: String,
    /// The pseudonymous patient id the card checks in.
    pub patient: String,
}

/// One device binding of a [`ConfigMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigBinding {
    /// The device id.
    pub device: String,
    /// The cuff user (BLS user index); absent: every reading of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u8>,
    /// The pseudonymous patient id.
    pub patient: String,
}

// ---------------------------------------------------------------------------------------------------------
// Symptom reports
// ---------------------------------------------------------------------------------------------------------

/// A patient's answer to the symptom question a reading's result asked (the kiosk's yes/no question,
/// CLINICAL.md §2.3: a crisis-range blood pressure asks about chest pain, shortness of breath, severe
/// headache, confusion or weakness; a low glucose asks about the signs of a severe hypoglycaemia), on
/// `{root}/symptoms` (QoS 1, not retained): schema `phg.symptoms/1`.
///
/// Ingest runs its rule engine's `on_symptoms` on it, as the gateway's edge engine did: symptoms skip
/// confirmation (CLINICAL.md §4.2), so a pending crisis becomes CRITICAL at once, and a reported severe
/// hypoglycaemia is `GLU_HYPO_L3`. It has a topic of its own, not an event type on `…/events`: events
/// are what went wrong or needs a person, stored as they come and never evaluated, and their `type`s are
/// fixed for version 1; a report is clinical input that is evaluated once per id, like a reading.
///
/// Unknown fields are ignored on reading; an unknown symptom name is not (a consumer must refuse the
/// message rather than read a symptom it does not know as none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymptomsMessage {
    /// [`SYMPTOMS_SCHEMA`].
    pub schema: String,
    /// The report's id, [`symptoms_report_id`] over `reading_id` and `symptoms`: the same answer to the
    /// same reading's question is the same report however often it is delivered.
    pub id: String,
    /// The gateway id.
    pub gateway: String,
    /// The pseudonymous patient id (the patient the reading was attributed to).
    pub patient: String,
    /// The id of the reading whose result asked the question.
    pub reading_id: String,
    /// The symptoms the patient said they have, by [`Symptom::name`]; empty when they answered "no".
    pub symptoms: Vec<Symptom>,
    /// When the patient answered, RFC 3339 UTC: the time the rule engine decides at.
    pub answered: String,
}

/// The deterministic id of a symptom report ([`SymptomsMessage::id`]): a version 5 UUID in
/// [`reading_id::NAMESPACE`] over the tag `sym.v1`, the reading's 16 bytes and the set of symptoms (one
/// bit per [`Symptom::ALL`] position).
pub fn symptoms_report_id(reading_id: &Uuid, symptoms: Symptoms) -> Uuid {
    let mask = Symptom::ALL
        .iter()
        .enumerate()
        .filter(|(_, s)| symptoms.contains(**s))
        .fold(0u8, |m, (i, _)| m | (1 << i));
    let mut name = [0u8; 24];
    name[..7].copy_from_slice(b"sym.v1\0");
    name[7..23].copy_from_slice(reading_id.as_bytes());
    name[23] = mask;
    Uuid::new_v5(&reading_id::NAMESPACE, &name)
}

impl SymptomsMessage {
    /// The answer `symptoms` of `patient` to the question of the reading `reading_id`, given at
    /// `answered_utc` (Unix s) on `gateway`.
    ///
    /// # Errors
    /// [`WireError::InvalidPatientId`] when `patient` is not a pseudonym, [`WireError::InvalidReadingId`]
    /// when `reading_id` is not a version 5 UUID, [`WireError::TimeOutOfRange`].
    pub fn new(
        gateway: &str,
        patient: &str,
        reading_id: &str,
        symptoms: Symptoms,
        answered_utc: i64,
    ) -> Result<SymptomsMessage, WireError> {
        if !is_valid_pseudonym(patient) {
            return Err(WireError::InvalidPatientId);
        }
        let reading = Uuid::try_parse(reading_id)
            .ok()
            .filter(|u| u.get_version_num() == 5)
            .ok_or(WireError::InvalidReadingId)?;
        Ok(SymptomsMessage {
            schema: SYMPTOMS_SCHEMA.to_owned(),
            id: symptoms_report_id(&reading, symptoms).to_string(),
            gateway: gateway.to_owned(),
            patient: patient.to_owned(),
            reading_id: reading.to_string(),
            symptoms: symptoms.iter().collect(),
            answered: time_string(answered_utc)?,
        })
    }

    /// The reported symptoms as a set (what the rule engine takes).
    pub fn symptom_set(&self) -> Symptoms {
        Symptoms::of(&self.symptoms)
    }

    /// The id this report must carry ([`symptoms_report_id`] over its content); `None` when its
    /// `reading_id` is not a UUID.
    pub fn expected_id(&self) -> Option<String> {
        let reading = Uuid::try_parse(&self.reading_id).ok()?;
        Some(symptoms_report_id(&reading, self.symptom_set()).to_string())
    }
}

#[cfg(test)]
mod symptoms_tests {
    use super::*;

    const READING: &str = "94271e75-c46f-5b34-8576-702696c5b216";
    /// 2024-06-15T05:53:00Z.
    const ANSWERED: i64 = 1_718_430_780;

    #[test]
    fn a_report_names_its_reading_and_symptoms_and_round_trips() {
        let crisis = Symptoms::of(&[Symptom::CrisisSymptoms]);
        let m = SymptomsMessage::new("gw-0001", "P-000123", READING, crisis, ANSWERED)
            .expect("a valid report");
        let json = serde_json::to_value(&m).expect("serialises");
        assert_eq!(json["schema"], "phg.symptoms/1");
        assert_eq!(json["reading_id"], READING);
        assert_eq!(json["symptoms"], serde_json::json!(["crisis_symptoms"]));
        assert_eq!(json["answered"], "2024-06-15T05:53:00Z");
        let back: SymptomsMessage = serde_json::from_value(json).expect("parses");
        assert_eq!(back, m);
        assert_eq!(back.symptom_set(), crisis);
        assert_eq!(back.expected_id().as_deref(), Some(m.id.as_str()));
        let id = Uuid::try_parse(&m.id).expect("a UUID");
        assert_eq!(id.get_version_num(), 5);
    }

    /// The same answer is the same report (a redelivery, a second journaling), whenever it was built; a
    /// different answer or another reading is another report.
    #[test]
    fn the_id_is_deterministic_over_reading_and_answer() {
        let reading = Uuid::try_parse(READING).expect("uuid");
        let other = Uuid::try_parse("1d5b623e-3efd-5e60-8ffc-38fa2e8cac8f").expect("uuid");
        let yes = Symptoms::of(&[Symptom::CrisisSymptoms]);
        let a = SymptomsMessage::new("gw-0001", "P-000123", READING, yes, ANSWERED).expect("ok");
        let b =
            SymptomsMessage::new("gw-0001", "P-000123", READING, yes, ANSWERED + 30).expect("ok");
        assert_eq!(a.id, b.id);
        // Upper-case input is the same reading.
        let c = SymptomsMessage::new(
            "gw-0001",
            "P-000123",
            &READING.to_uppercase(),
            yes,
            ANSWERED,
        )
        .expect("ok");
        assert_eq!(
            (c.id.as_str(), c.reading_id.as_str()),
            (a.id.as_str(), READING)
        );
        let ids = [
            symptoms_report_id(&reading, yes),
            symptoms_report_id(&reading, Symptoms::NONE),
            symptoms_report_id(&reading, Symptoms::of(&[Symptom::SevereHypoglycaemia])),
            symptoms_report_id(&reading, Symptoms::of(&Symptom::ALL)),
            symptoms_report_id(&other, yes),
        ];
        for (i, x) in ids.iter().enumerate() {
            for y in ids.iter().skip(i + 1) {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn a_no_answer_is_an_empty_list() {
        let m = SymptomsMessage::new("gw-0001", "P-000123", READING, Symptoms::NONE, ANSWERED)
            .expect("ok");
        assert!(m.symptoms.is_empty());
        let text = serde_json::to_string(&m).expect("serialises");
        assert!(text.contains(r#""symptoms":[]"#), "{text}");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let yes = Symptoms::of(&[Symptom::CrisisSymptoms]);
        assert_eq!(
            SymptomsMessage::new("gw", "Jane Doe", READING, yes, ANSWERED),
            Err(WireError::InvalidPatientId)
        );
        assert_eq!(
            SymptomsMessage::new("gw", "P-000123", "r-1", yes, ANSWERED),
            Err(WireError::InvalidReadingId)
        );
        assert!(matches!(
            SymptomsMessage::new("gw", "P-000123", READING, yes, i64::MAX / 2),
            Err(WireError::TimeOutOfRange { .. })
        ));
    }

    /// A symptom this version does not know is not read as no symptom: the message does not parse.
    #[test]
    fn an_unknown_symptom_name_does_not_parse() {
        let m = SymptomsMessage::new(
            "gw-0001",
            "P-000123",
            READING,
            Symptoms::of(&[Symptom::CrisisSymptoms]),
            ANSWERED,
        )
        .expect("ok");
        let mut json = serde_json::to_value(&m).expect("serialises");
        json["symptoms"] = serde_json::json!(["crisis_symptoms", "palpitations"]);
        assert!(serde_json::from_value::<SymptomsMessage>(json).is_err());
        for s in Symptom::ALL {
            assert_eq!(Symptom::from_name(s.name()), Some(s));
            assert_eq!(
                serde_json::to_value(s).expect("serialises"),
                serde_json::json!(s.name())
            );
        }
        assert_eq!(Symptom::from_name("palpitations"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ieee11073::SFloat;
    use crate::model::{
        BloodPressureRecord, Glucose, GlucoseRecord, MG_PER_DL_PER_MMOL_PER_L, MMHG_PER_KPA,
        Pressure,
    };
    use crate::validate::{Flags, validate};

    const METER: &str = "00:11:22:33:44:55";
    const CUFF: &str = "A4:C1:38:0B:5E:21";
    /// 2024-06-15T17:27:27Z: ten minutes after the measurements below.
    const RX_UTC: i64 = 1_718_471_847 + 600;

    fn t() -> DateTime {
        DateTime {
            year: 2024,
            month: 6,
            day: 15,
            hours: 17,
            minutes: 17,
            seconds: 27,
        }
    }

    fn glucose(m: i32, e: i8, mol: bool, status: Option<u16>) -> Measurement {
        Measurement::Glucose(GlucoseRecord {
            sequence_number: 7,
            numbering: crate::model::RecordNumbering::Gls,
            base_time: t(),
            time_offset_min: None,
            concentration: Some(Glucose::from_wire(SFloat::new(m, e).unwrap(), mol)),
            sample_type: Some(1),
            sample_location: Some(1),
            sensor_status: status,
            context: None,
        })
    }

    fn bp(
        unit: PressureUnit,
        sys: (i32, i8),
        dia: (i32, i8),
        map: (i32, i8),
        status: Option<u16>,
    ) -> Measurement {
        let p = |(m, e)| Pressure {
            raw: SFloat::new(m, e).unwrap(),
            unit,
        };
        Measurement::BloodPressure(BloodPressureRecord {
            systolic: p(sys),
            diastolic: p(dia),
            mean_arterial_pressure: p(map),
            timestamp: Some(t()),
            pulse_rate: Some(SFloat::new(72, 0).unwrap()),
            user_id: Some(2),
            measurement_status: status,
        })
    }

    fn message(device: &str, m: &Measurement, rx: &Reception) -> Result<ReadingMessage, WireError> {
        let v = validate(m, rx);
        ReadingMessage::new("gw-0001", "P-000123", DeviceRef::new(device), m, &v, rx)
    }

    #[test]
    fn glucose_message_has_the_reading_id_and_both_units() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(420),
        };
        let msg = message(METER, &glucose(126, -5, false, None), &rx).unwrap();
        assert_eq!(msg.schema, "phg.reading/1");
        assert_eq!(msg.id, reading_id::glucose(METER, 7).to_string());
        assert_eq!(msg.id, "20178b84-9cc1-5407-9253-b99b9ffbffec"); // reading_id's pinned answer
        assert_eq!(msg.body.kind, Kind::Glucose);
        assert_eq!(msg.body.sequence_number, Some(7));
        let g = msg.body.glucose.unwrap();
        assert_eq!(
            (g.value, g.unit, g.mg_per_dl),
            (Some(126.0), Some(GlucoseUnit::MgPerDl), Some(126.0))
        );
        assert_eq!(g.mmol_per_l, Some(126.0 / 18.016));
        assert_eq!(msg.body.blood_pressure, None);
        assert_eq!(msg.body.quality, Quality::Valid);
        // Meter 7 minutes fast: corrected = device time − 420 s.
        assert_eq!(msg.body.time.device.as_deref(), Some("2024-06-15T17:17:27"));
        assert_eq!(msg.body.time.received, "2024-06-15T17:27:27Z");
        assert_eq!(
            msg.body.time.corrected.as_deref(),
            Some("2024-06-15T17:10:27Z")
        );
        assert_eq!(msg.body.time.clock_offset_s, Some(420));
        assert!(msg.body.time.trusted);
        assert_eq!(msg.body.time.doubt, None);
        assert!(msg.body.status.flags.is_empty());
    }

    #[test]
    fn mmol_meter_keeps_native_value_and_derives_mg_per_dl() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let Measurement::Glucose(mut g) = glucose(39, -4, true, None) else {
            unreachable!()
        };
        g.context = Some(GlucoseContextInfo {
            meal: Some(3),
            tester: Some(1),
            health: Some(15),
            carbohydrate: Some((1, Some(45.0))),
            exercise: Some((1800, 60)),
            medication: Some((4, Some(12.0), false)),
            hba1c_pct: Some(6.8),
        });
        let msg = message(METER, &Measurement::Glucose(g), &rx).unwrap();
        let v = msg.body.glucose.unwrap();
        assert_eq!(v.value, Some(3.9));
        assert_eq!(v.unit, Some(GlucoseUnit::MmolPerL));
        assert_eq!(v.mg_per_dl, Some(3.9 * MG_PER_DL_PER_MMOL_PER_L));
        let c = msg.body.context.unwrap();
        assert_eq!(c.meal.as_deref(), Some("fasting"));
        assert_eq!(c.tester.as_deref(), Some("self"));
        assert_eq!(c.health.as_deref(), Some("not_available"));
        assert_eq!(c.carbohydrate.unwrap().meal, "breakfast");
        assert_eq!(c.medication.unwrap().kind, "long_acting_insulin");
    }

    #[test]
    fn reserved_context_codes_stay_visible() {
        let c = GlucoseContext::from(&GlucoseContextInfo {
            meal: Some(6),
            tester: Some(9),
            ..Default::default()
        });
        assert_eq!(c.meal.as_deref(), Some("reserved:6"));
        assert_eq!(c.tester.as_deref(), Some("reserved:9"));
    }

    #[test]
    fn censored_glucose_without_concentration_is_published_as_censored() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let Measurement::Glucose(mut g) = glucose(20, -5, false, Some(0x0040)) else {
            unreachable!()
        };
        g.concentration = None;
        let msg = message(METER, &Measurement::Glucose(g), &rx).unwrap();
        assert_eq!(msg.body.quality, Quality::Censored);
        let v = msg.body.glucose.unwrap();
        assert_eq!(
            (v.value, v.unit, v.censored),
            (None, None, Some(Censor::Low))
        );
        assert_eq!(msg.body.status.sensor_status, Some(0x0040));
    }

    #[test]
    fn kpa_cuff_keeps_kpa_and_derives_mmhg_and_takes_the_record_user() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let m = bp(PressureUnit::KPa, (160, -1), (107, -1), (125, -1), None);
        let msg = message(CUFF, &m, &rx).unwrap();
        assert_eq!(msg.id, reading_id_of(CUFF, &m).to_string());
        assert_eq!(msg.body.device.user_id, Some(2));
        let b = msg.body.blood_pressure.unwrap();
        assert_eq!(
            (b.unit, b.systolic, b.diastolic),
            (PressureUnit::KPa, 16.0, 10.7)
        );
        assert_eq!(b.systolic_mmhg, 16.0 * MMHG_PER_KPA);
        assert_eq!(b.map_mmhg, Some(12.5 * MMHG_PER_KPA));
        assert_eq!(b.pulse_bpm, Some(72.0));
        assert_eq!(msg.body.sequence_number, None);
    }

    #[test]
    fn beurer_map_zero_is_absent() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let msg = message(
            CUFF,
            &bp(PressureUnit::MmHg, (120, 0), (80, 0), (0, 0), None),
            &rx,
        )
        .unwrap();
        let b = msg.body.blood_pressure.unwrap();
        assert_eq!((b.mean_arterial_pressure, b.map_mmhg), (None, None));
    }

    #[test]
    fn low_quality_bp_carries_status_and_flags() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let msg = message(
            CUFF,
            &bp(
                PressureUnit::MmHg,
                (138, 0),
                (88, 0),
                (105, 0),
                Some(0x0001),
            ),
            &rx,
        )
        .unwrap();
        assert_eq!(msg.body.quality, Quality::LowQuality);
        assert_eq!(msg.body.status.measurement_status, Some(0x0001));
        assert_eq!(msg.body.status.flags, ["body_movement"]);
    }

    #[test]
    fn unread_clock_is_untrusted_without_corrected_time() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: None,
        };
        let msg = message(METER, &glucose(126, -5, false, None), &rx).unwrap();
        assert_eq!(msg.body.time.corrected, None);
        assert!(!msg.body.time.trusted);
        assert_eq!(msg.body.time.doubt, Some(TimeDoubt::ClockNotRead));
        assert_eq!(msg.body.status.flags, ["time_untrusted"]);
    }

    #[test]
    fn excluded_readings_are_events_not_readings() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let m = glucose(700, -5, false, None);
        let v = validate(&m, &rx);
        let err = ReadingMessage::new("gw", "P-1", DeviceRef::new(METER), &m, &v, &rx).unwrap_err();
        assert_eq!(
            err,
            WireError::NotAPatientReading {
                outcome: "rejected"
            }
        );
        let Some(Event::ReadingRejected {
            reading_id,
            reason_code,
            detail,
            ..
        }) = Event::for_excluded(METER, Some("P-1"), &m, &v)
        else {
            panic!("not a rejection event")
        };
        assert_eq!(reading_id, reading_id::glucose(METER, 7).to_string());
        assert_eq!(reason_code, "out_of_range");
        assert_eq!(detail.value, Some(700.0));
        assert_eq!(detail.unit.as_deref(), Some("mg/dL"));
        assert_eq!(
            Event::for_excluded(
                METER,
                None,
                &glucose(126, -5, false, None),
                &validate(&glucose(126, -5, false, None), &rx)
            ),
            None
        );
    }

    #[test]
    fn patient_must_be_a_pseudonym() {
        for ok in [
            "P-000123",
            "5b8e2f43-910c-4d6a-9f27-3ad160c48b1e",
            "clinic7:4711",
        ] {
            assert!(is_valid_pseudonym(ok), "{ok}");
        }
        for bad in ["", "Jane Doe", "jane@example.org", "-x", &"a".repeat(129)] {
            assert!(!is_valid_pseudonym(bad), "{bad}");
        }
    }

    /// Issue 11 defect 9: names and national ids that fit the character set are refused too (the rule
    /// in `is_valid_pseudonym`'s doc), and the ids the project's examples use stay valid.
    #[test]
    fn names_and_national_ids_are_not_pseudonyms() {
        for ok in [
            "p-home-0001",
            "p-clinic-0042",
            "p-7f3a-0001",
            "p-001",
            "P-000123",
            "5b8e2f43-910c-4d6a-9f27-3ad160c48b1e",
            "clinic7:4711",
            "p-1234567890123456789",
        ] {
            assert!(is_valid_pseudonym(ok), "{ok}");
        }
        for bad in [
            // Names: no digit.
            "JohnSmith",
            "john.smith",
            "Mueller",
            "p-home",
            // Numbers: no letter.
            "0123456789",
            "123-45-6789",
            // US SSN, CN resident id, UK NINO inside an otherwise well-formed id.
            "p-123-45-6789",
            "ssn123-45-6789",
            "11010519491231002X",
            "11010519491231002x",
            "p-110105194912310021",
            "p11010519491231002X",
            "AB123456C",
            "p-AB123456C",
            "p-123456789",
        ] {
            assert!(!is_valid_pseudonym(bad), "{bad}");
        }
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let m = glucose(126, -5, false, None);
        let v = validate(&m, &rx);
        assert_eq!(
            ReadingMessage::new("gw", "Jane Doe", DeviceRef::new(METER), &m, &v, &rx),
            Err(WireError::InvalidPatientId)
        );
    }

    #[test]
    fn rfc3339_and_hex_helpers() {
        assert_eq!(
            rfc3339_utc(1_718_471_847).as_deref(),
            Some("2024-06-15T17:17:27Z")
        );
        assert_eq!(rfc3339_utc(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(rfc3339_utc(i64::MAX / 2), None);
        assert_eq!(to_hex(&[0x1E, 0x8A, 0x00]), "1e8a00");
        let e = Event::decode_failed(METER, 0x2A18, &[0x00, 0xFF], &"too short");
        assert_eq!(
            e,
            Event::DecodeFailed {
                device: METER.into(),
                characteristic: "2A18".into(),
                hex: "00ff".into(),
                error: "too short".into()
            }
        );
    }

    #[test]
    fn topics_follow_the_contract() {
        let t = Topics::for_gateway("gw-0001");
        assert_eq!(t.readings(), "phg/v1/gw-0001/readings");
        assert_eq!(t.events(), "phg/v1/gw-0001/events");
        assert_eq!(t.status(), "phg/v1/gw-0001/status");
        assert_eq!(t.alerts(), "phg/v1/gw-0001/alerts");
        assert_eq!(t.config(), "phg/v1/gw-0001/config");
        assert_eq!(t.symptoms(), "phg/v1/gw-0001/symptoms");
        assert_eq!(Topics::new("clinic/a/").readings(), "clinic/a/readings");
        assert!(
            Channel::Status.retained()
                && Channel::Config.retained()
                && !Channel::Readings.retained()
        );
        assert!(Channel::ALL.iter().all(|c| c.qos() == 1));
        assert!(
            is_valid_topic_level("gw-0001")
                && !is_valid_topic_level("a/b")
                && !is_valid_topic_level("#")
        );
    }

    #[test]
    fn serde_round_trip_and_shape() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let msg = message(
            CUFF,
            &bp(PressureUnit::MmHg, (124, 0), (86, 0), (97, 0), None),
            &rx,
        )
        .unwrap();
        let json = serde_json::to_value(&msg).unwrap();
        assert_eq!(json["blood_pressure"]["unit"], "mmHg");
        assert_eq!(json["kind"], "blood_pressure");
        assert_eq!(json["quality"], "valid");
        assert!(
            json.get("glucose").is_none(),
            "absent fields are omitted, not null"
        );
        let back: ReadingMessage = serde_json::from_value(json).unwrap();
        assert_eq!(back, msg);

        let status = StatusMessage::offline("gw-0001");
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"schema":"phg.status/1","gateway":"gw-0001","state":"offline"}"#
        );
        let ev = EventMessage::new(
            "gw-0001",
            RX_UTC,
            Event::JournalFull {
                depth: 10,
                max: 10,
                device: None,
            },
        )
        .unwrap();
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["event"]["type"], "journal_full");
        assert_eq!(serde_json::from_value::<EventMessage>(json).unwrap(), ev);
    }

    /// The body is flattened: the readings JSON keeps its one-object shape and field order, envelope first.
    #[test]
    fn reading_body_is_flattened_into_the_message() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(420),
        };
        let msg = message(METER, &glucose(126, -5, false, None), &rx).unwrap();
        let text = serde_json::to_string(&msg).unwrap();
        let keys = [
            "schema",
            "id",
            "gateway",
            "patient",
            "device",
            "kind",
            "sequence_number",
            "glucose",
            "time",
            "status",
            "quality",
        ];
        let at: Vec<usize> = keys
            .iter()
            .map(|k| text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(
            text.starts_with(r#"{"schema":"phg.reading/1","id":"#),
            "{text}"
        );
        let json = serde_json::to_value(&msg).unwrap();
        assert!(json.get("body").is_none(), "no nested body object");
        // The body alone is the message minus its envelope.
        let mut envelope_free = json.as_object().unwrap().clone();
        for k in ["schema", "id", "gateway", "patient"] {
            envelope_free.remove(k);
        }
        assert_eq!(
            serde_json::to_value(&msg.body).unwrap(),
            serde_json::Value::Object(envelope_free)
        );
        // A newer minor revision's extra field, top level or in the body, is ignored.
        let mut extended = json;
        extended["firmware_hint"] = serde_json::json!({"x": 1});
        extended["time"]["ntp_synchronised"] = serde_json::json!(true);
        assert_eq!(
            serde_json::from_value::<ReadingMessage>(extended).unwrap(),
            msg
        );
    }

    /// An unattributed reading is held whole: the event carries the body a reading message would carry,
    /// under the id it would be published with.
    #[test]
    fn unattributed_event_holds_the_whole_reading() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        for (device, m) in [
            (
                CUFF,
                bp(PressureUnit::MmHg, (131, 0), (84, 0), (99, 0), Some(0x0001)),
            ),
            (METER, glucose(126, -5, false, Some(0x0001))),
        ] {
            let v = validate(&m, &rx);
            let msg = message(device, &m, &rx).unwrap();
            let event = Event::unattributed(DeviceRef::new(device), &m, &v, &rx).unwrap();
            let Event::Unattributed {
                reading_id,
                device: dev,
                user_id,
                kind,
                reading,
            } = &event
            else {
                panic!("not an unattributed event")
            };
            assert_eq!(*reading_id, msg.id);
            assert_eq!(*reading_id, reading_id_of(device, &m).to_string());
            assert_eq!(dev, device);
            assert_eq!(*kind, Kind::of(&m));
            assert_eq!(**reading, msg.body, "the same body as the reading message");
            match &m {
                Measurement::BloodPressure(_) => {
                    assert_eq!(*user_id, Some(2));
                    assert_eq!(reading.device.user_id, Some(2));
                    assert_eq!(reading.blood_pressure.unwrap().systolic, 131.0);
                    assert_eq!(reading.quality, Quality::LowQuality);
                }
                Measurement::Glucose(_) => {
                    assert_eq!(*user_id, None);
                    assert_eq!(reading.glucose.unwrap().mg_per_dl, Some(126.0));
                    assert_eq!(reading.sequence_number, Some(7));
                }
            }
            // Journaled as an event message, it reads back whole.
            let em = EventMessage::new("gw-0001", RX_UTC, event.clone()).unwrap();
            let json = serde_json::to_value(&em).unwrap();
            assert_eq!(json["event"]["type"], "unattributed");
            assert_eq!(
                json["event"]["reading"],
                serde_json::to_value(&msg.body).unwrap()
            );
            assert_eq!(serde_json::from_value::<EventMessage>(json).unwrap(), em);
        }
    }

    #[test]
    fn unattributed_is_only_for_patient_readings() {
        let rx = Reception {
            received_utc: RX_UTC,
            clock_offset_s: Some(0),
        };
        let m = glucose(700, -5, false, None);
        let v = validate(&m, &rx);
        assert_eq!(
            Event::unattributed(DeviceRef::new(METER), &m, &v, &rx),
            Err(WireError::NotAPatientReading {
                outcome: "rejected"
            })
        );
        assert_eq!(
            ReadingBody::new(DeviceRef::new(METER), &m, &v, &rx),
            Err(WireError::NotAPatientReading {
                outcome: "rejected"
            })
        );
    }

    /// A newer minor revision's extra fields do not break this version's reader.
    #[test]
    fn unknown_fields_are_ignored() {
        let json = r#"{"schema":"phg.status/1","gateway":"g","state":"online","uptime_s":5,"future":{"x":1}}"#;
        let s: StatusMessage = serde_json::from_str(json).unwrap();
        assert_eq!(s.state, GatewayState::Online);
    }

    #[test]
    fn every_flag_has_a_name() {
        assert_eq!(Flags(u32::MAX).names().count(), 11);
    }
}
