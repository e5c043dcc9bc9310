//! Storage: one [`Store`] trait, two implementations ([`SqliteStore`], embedded, the default;
//! [`PgStore`], PostgreSQL by URL, for production and several hosts). Both run one batch loop
//! (`batch.rs`: what a batch stores, evaluates and writes, in which order, under which locks); each
//! gives it only its SQL dialect.
//!
//! # Guarantees (both implementations; `ingest/tests/storage.rs` runs the same tests on each)
//!
//! - **Idempotent by reading id.** `readings.id` is the primary key; a redelivered or duplicated message
//!   inserts nothing, is not evaluated again and raises no alert again.
//! - **One transaction per batch**: the readings, the engine state of their patients, the alerts, their
//!   events and the outbox rows commit together, *before* the MQTT messages are acknowledged. A crash
//!   before the commit leaves nothing and the broker redelivers.
//! - **No double alert across instances.** Alert ids are deterministic (`{patient}/{rule}/{time}`, from
//!   the engine) and unique; alert events have deterministic ids (unique); and a patient's state is
//!   locked while evaluated, so two instances never evaluate one patient's readings at once.
//! - **Durable outbox, leased.** Every alert event is queued once per sink. A deliverer *claims* due rows
//!   with a lease (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite: a conditional `UPDATE … RETURNING` under
//!   the database's single writer lock), so two instances never deliver the same row at the same time;
//!   a row whose deliverer died is claimed again when its lease runs out (at-least-once: receivers
//!   de-duplicate on the event id).
//!
//! # Tables
//!
//! `readings` (id, patient, gateway, kind, time_utc, received_utc, stored_ms, instance, payload,
//! eval_error), `patient_state` (the engine state per patient, JSON, without its BP history; its next
//! deadline; the revision of its history: see [`crate::evaluate`]), `bp_history` (the BP readings each
//! patient's engine keeps for its window rules, a row each), `patient_settings` (profile and
//! overrides, JSON), `alerts` (one row per episode, latest state), `alert_events` (every transition),
//! `outbox` (event × sink, with attempts, next attempt, lease, delivered time), `gateway_events` (the
//! gateways' `…/events` messages), `bad_messages` (payloads that did not parse, kept for inspection),
//! `symptom_reports` (the gateways' `…/symptoms` messages: see [Symptom reports](#symptom-reports)).
//!
//! # Symptom reports
//!
//! A `phg.symptoms/1` report (a patient's answer to the kiosk's question about one reading) is stored
//! once by its deterministic id and evaluated once, like a reading: in the batch's transaction, under
//! the patient's lock, the engine's `on_symptoms` at the answer time. The report follows its reading on
//! the gateway's journal, but the two travel on two topics and may reach two instances, so the reading
//! can be stored second; a reading is therefore evaluated with the symptoms of the reports about it
//! stored before it (in an earlier commit, or earlier in its batch). Both checks run under the
//! patient's lock, so whichever of the two commits second sees the first: a crisis reading and a "yes"
//! give one CRITICAL alert in either order.

use std::future::Future;
use std::sync::Arc;

use protocol::rules::Symptoms;
use protocol::wire::{ReadingMessage, SymptomsMessage};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::convert::{ConvertError, EngineReading, engine_reading};
use crate::evaluate::{DigestItem, EvalError, Evaluator, Input, Sink, digest_notice};
use protocol::rules::Severity;

mod batch;
mod postgres;
mod sqlite;

pub use postgres::{PgStore, postgres_tls};
pub use sqlite::SqliteStore;

/// A storage failure. The transaction is rolled back; the messages of the batch stay unacknowledged
/// and the broker redelivers them (recoverable once the database is back).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The rule engine.
    #[error("evaluation: {0}")]
    Eval(#[from] EvalError),
    /// A JSON column could not be written or read.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A blocking task panicked or was cancelled.
    #[error("storage task: {0}")]
    Task(String),
    /// The database URL is not one we know.
    #[error("database url: {0}")]
    Url(String),
    /// TLS to the database could not be set up.
    #[error("database tls: {0}")]
    Tls(String),
    /// The schema could not be brought to this version (or the database is from a newer ingest).
    #[error("schema migration: {0}")]
    Migration(#[from] refinery::Error),
}

/// Which stream a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `…/readings`.
    Readings,
    /// `…/events`.
    Events,
    /// `…/symptoms`.
    Symptoms,
}

/// One MQTT message to store.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Its topic.
    pub topic: String,
    /// Which stream.
    pub channel: Channel,
    /// The payload as received.
    pub payload: Vec<u8>,
    /// The largest payload accepted (`[mqtt] max_message_size`); a larger one is recorded in
    /// `bad_messages` without its content and acknowledged. `None`: no limit.
    pub max_len: Option<usize>,
}

/// What storing one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A new reading or symptom report: stored and evaluated; `alerts` alert events were written.
    New {
        /// Alert events written.
        alerts: usize,
    },
    /// A reading or symptom report already stored (redelivery or duplicate): nothing written.
    Duplicate,
    /// A gateway event, stored (or already stored).
    Event,
    /// A new reading (or symptom report) that is rejected (impossible value or time, see
    /// [`ConvertError`]): stored with its reason, never evaluated.
    Rejected(String),
    /// A message that is not a valid reading/event (or a reading id already stored with other content):
    /// kept in `bad_messages`, acknowledged.
    Bad(String),
}

/// A message parsed for storing ([`prepare`]).
#[derive(Debug)]
pub enum Prepared {
    /// A reading to store (and evaluate, when `engine` is `Ok`).
    Reading {
        /// The parsed message.
        msg: Box<ReadingMessage>,
        /// The payload as received.
        payload: String,
        /// Measured at (Unix s); the received time when the reading cannot be evaluated.
        time_utc: i64,
        /// Received by the gateway at (Unix s).
        received_utc: i64,
        /// The reading for the rule engine, or why there is none.
        engine: Result<EngineReading, ConvertError>,
    },
    /// A gateway event to store.
    Event {
        /// Its id (a digest of topic and payload).
        id: String,
        /// The gateway it names.
        gateway: String,
        /// Its kind.
        kind: String,
        /// The payload as received.
        payload: String,
    },
    /// A symptom report to store (and evaluate, when `symptoms` is `Ok`).
    Symptoms {
        /// The parsed message.
        msg: Box<SymptomsMessage>,
        /// The payload as received.
        payload: String,
        /// Answered at (Unix s).
        answered_utc: i64,
        /// The symptoms for the rule engine, or why the report is not evaluated (an answer time in the
        /// future).
        symptoms: Result<Symptoms, String>,
    },
    /// A message kept in `bad_messages`.
    Bad {
        /// Its id (a digest of topic and payload).
        id: String,
        /// Its topic.
        topic: String,
        /// What is wrong, never a value.
        error: String,
        /// The payload (lossy UTF-8).
        payload: String,
    },
}

fn digest_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0u8]);
    }
    protocol::wire::to_hex(h.finalize().get(..16).unwrap_or_default())
}

/// A JSON error without the offending value (serde's messages quote it, and a payload value must not
/// reach the log).
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "a field is missing or has the wrong type",
        serde_json::error::Category::Eof => "truncated",
    };
    format!("{what} at line {}, column {}", e.line(), e.column())
}

/// The gateway level of `{root}/{gateway}/readings` (or `…/events`).
fn topic_gateway(topic: &str) -> Option<&str> {
    topic.rsplit('/').nth(1)
}

/// Whether `schema` is `{name}/1` or `{name}/1.{minor}`: major version 1 is the contract ingest reads
/// (DESIGN.md "The MQTT contract (v1)"); another major version may mean anything and is refused.
fn is_major_1(schema: &str, name: &str) -> bool {
    schema
        .strip_prefix(name)
        .and_then(|v| v.strip_prefix('/'))
        .is_some_and(|v| v == "1" || v.strip_prefix("1.").is_some_and(|m| !m.is_empty()))
}

/// Whether `id` is a version 5 (name-based, SHA-1) RFC 4122 UUID, which every reading id is
/// (`protocol::reading_id`).
fn is_v5_uuid(id: &str) -> bool {
    uuid::Uuid::try_parse(id)
        .is_ok_and(|u| u.get_version_num() == 5 && u.get_variant() == uuid::Variant::RFC4122)
}

/// What a reading id stands for: the same measurement (device, values, context) on the same patient.
/// The times, status flags and gateway may differ between two downloads of one record and are left out.
fn content(msg: &ReadingMessage) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(msg).ok()?;
    if let Some(o) = v.as_object_mut() {
        for k in ["time", "status", "gateway", "schema"] {
            o.remove(k);
        }
    }
    Some(v)
}

/// Whether `new` is another message than the one stored under its id (`stored`, the stored payload):
/// then the same id names two measurements, and the second is recorded as a conflict, not dropped.
pub(crate) fn conflicts(stored: &str, new: &ReadingMessage) -> bool {
    match serde_json::from_str::<ReadingMessage>(stored) {
        Ok(old) => content(&old) != content(new),
        Err(_) => true,
    }
}

/// The `bad_messages` record of a reading whose id is stored with other content.
pub(crate) fn conflict_record(topic: &str, payload: &str) -> Prepared {
    Prepared::Bad {
        id: digest_hex(&[topic.as_bytes(), payload.as_bytes()]),
        topic: topic.to_owned(),
        error: "conflict: this reading id is stored with other content".into(),
        payload: payload.to_owned(),
    }
}

/// Parses a message. Never fails: what does not parse, or is not a reading or event
/// ingest may store, becomes [`Prepared::Bad`] (with a reason that names no value). Public so the fuzz
/// target `ingest_payload` runs exactly what ingest runs on every MQTT payload.
pub fn prepare(m: &Inbound) -> Prepared {
    let bad = |error: String| Prepared::Bad {
        id: digest_hex(&[m.topic.as_bytes(), &m.payload]),
        topic: m.topic.clone(),
        error,
        payload: String::from_utf8_lossy(&m.payload).into_owned(),
    };
    if let Some(limit) = m.max_len.filter(|l| m.payload.len() > *l) {
        // Recorded without its content: it is larger than anything a gateway sends, and storing it
        // would let one publisher fill the database.
        return Prepared::Bad {
            id: digest_hex(&[m.topic.as_bytes(), &m.payload]),
            topic: m.topic.clone(),
            error: format!(
                "too large: {} bytes, more than mqtt.max_message_size ({limit})",
                m.payload.len()
            ),
            payload: String::new(),
        };
    }
    let Ok(text) = std::str::from_utf8(&m.payload) else {
        return bad("payload is not UTF-8".into());
    };
    let gateway_of_topic = topic_gateway(&m.topic).unwrap_or_default();
    match m.channel {
        Channel::Readings => {
            let msg: ReadingMessage = match serde_json::from_str(text) {
                Ok(msg) => msg,
                Err(e) => {
                    // Another major version need not parse as this one: say so rather than "missing field".
                    let schema = serde_json::from_str::<serde_json::Value>(text)
                        .ok()
                        .and_then(|v| v.get("schema")?.as_str().map(str::to_owned));
                    if schema.is_some_and(|s| !is_major_1(&s, "phg.reading")) {
                        return bad("unknown schema: ingest reads phg.reading/1".into());
                    }
                    return bad(format!("not a phg.reading/1 message: {}", json_error(&e)));
                }
            };
            if !is_major_1(&msg.schema, "phg.reading") {
                return bad("unknown schema: ingest reads phg.reading/1".into());
            }
            if !is_v5_uuid(&msg.id) {
                return bad("id is not a version 5 UUID".into());
            }
            if msg.gateway != gateway_of_topic {
                return bad("gateway differs from the topic's gateway".into());
            }
            if !protocol::wire::is_valid_pseudonym(&msg.patient) {
                return bad("patient is not a pseudonymous id".into());
            }
            let received_utc = crate::convert::parse_rfc3339_utc(&msg.body.time.received);
            let Some(received_utc) = received_utc else {
                return bad("time.received is not RFC 3339 UTC".into());
            };
            // Times are judged against this machine's clock, as the gateway judges them against its own.
            let engine = engine_reading(&msg, crate::now_ms().div_euclid(1000));
            let time_utc = engine.as_ref().map_or(received_utc, |e| e.time_utc);
            Prepared::Reading {
                msg: Box::new(msg),
                payload: text.to_owned(),
                time_utc,
                received_utc,
                engine,
            }
        }
        Channel::Symptoms => match prepare_symptoms(text, gateway_of_topic) {
            Ok(p) => p,
            Err(error) => bad(error),
        },
        Channel::Events => {
            let v: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => return bad(format!("not JSON: {}", json_error(&e))),
            };
            if !v.is_object() {
                return bad("not a JSON object".into());
            }
            if let Some(schema) = v.get("schema").and_then(|s| s.as_str())
                && !is_major_1(schema, "phg.event")
            {
                return bad("unknown schema: ingest reads phg.event/1".into());
            }
            let gateway = match v.get("gateway") {
                None => gateway_of_topic.to_owned(),
                Some(serde_json::Value::String(g)) if g == gateway_of_topic => g.clone(),
                Some(_) => return bad("gateway differs from the topic's gateway".into()),
            };
            let kind = v
                .get("event")
                .and_then(|e| e.get("kind").or_else(|| e.get("type")))
                .and_then(|k| k.as_str())
                .unwrap_or("unknown")
                .to_owned();
            Prepared::Event {
                id: digest_hex(&[m.topic.as_bytes(), &m.payload]),
                gateway,
                kind,
                payload: text.to_owned(),
            }
        }
    }
}

/// The symptom names this version reads, for a rejection's reason.
fn symptom_names() -> String {
    protocol::rules::Symptom::ALL
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `phg.symptoms/1` report, checked as readings are (schema version, v5 ids, the gateway of the topic,
/// the pseudonym) and more: its id must be the one its content gives, and every symptom must be one
/// this version knows (a newer gateway's symptom is refused, not read as no symptom). `Err` is the
/// reason it goes to `bad_messages`, naming no value.
fn prepare_symptoms(text: &str, gateway_of_topic: &str) -> Result<Prepared, String> {
    const WANT: &str = "unknown schema: ingest reads phg.symptoms/1";
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("not a phg.symptoms/1 message: {}", json_error(&e)))?;
    if let Some(schema) = v.get("schema").and_then(|s| s.as_str())
        && !is_major_1(schema, "phg.symptoms")
    {
        return Err(WANT.into());
    }
    if let Some(list) = v.get("symptoms").and_then(|s| s.as_array())
        && list.iter().any(|n| {
            n.as_str()
                .and_then(protocol::rules::Symptom::from_name)
                .is_none()
        })
    {
        return Err(format!(
            "unknown symptom in `symptoms`: ingest reads {}",
            symptom_names()
        ));
    }
    // From the text again (not the value): the error then says where.
    let msg: SymptomsMessage = serde_json::from_str(text)
        .map_err(|e| format!("not a phg.symptoms/1 message: {}", json_error(&e)))?;
    if !is_major_1(&msg.schema, "phg.symptoms") {
        return Err(WANT.into());
    }
    if !is_v5_uuid(&msg.reading_id) {
        return Err("reading_id is not a version 5 UUID".into());
    }
    if !is_v5_uuid(&msg.id) {
        return Err("id is not a version 5 UUID".into());
    }
    let mut names = msg.symptoms.clone();
    names.sort_by_key(|s| s.name());
    names.dedup();
    if names.len() != msg.symptoms.len() {
        return Err("a symptom is listed twice in `symptoms`".into());
    }
    if msg.expected_id().as_deref() != Some(msg.id.as_str()) {
        return Err("id is not the report id of its reading_id and symptoms".into());
    }
    if msg.gateway != gateway_of_topic {
        return Err("gateway differs from the topic's gateway".into());
    }
    if !protocol::wire::is_valid_pseudonym(&msg.patient) {
        return Err("patient is not a pseudonymous id".into());
    }
    let answered_utc =
        crate::convert::parse_rfc3339_utc(&msg.answered).ok_or("answered is not RFC 3339 UTC")?;
    // As a reading's received time: an answer from the future would be decided at a time not yet come.
    let now = crate::now_ms().div_euclid(1000);
    let symptoms = if answered_utc.saturating_sub(now) > protocol::validate::FUTURE_SKEW_S {
        Err("rejected: time_in_future: answered".to_owned())
    } else {
        Ok(msg.symptom_set())
    };
    Ok(Prepared::Symptoms {
        payload: text.to_owned(),
        answered_utc,
        symptoms,
        msg: Box::new(msg),
    })
}

/// Whether `new` is another report than the one stored under its id (`stored`, the stored payload). The
/// id covers the reading and the symptoms, so only the patient can differ: the same answer filed under
/// two patients is recorded as a conflict, not dropped.
pub(crate) fn report_conflicts(stored: &str, new: &SymptomsMessage) -> bool {
    match serde_json::from_str::<SymptomsMessage>(stored) {
        Ok(old) => {
            (old.patient.as_str(), old.reading_id.as_str())
                != (new.patient.as_str(), new.reading_id.as_str())
        }
        Err(_) => true,
    }
}

/// The `bad_messages` record of a symptom report whose id is stored with other content.
pub(crate) fn report_conflict_record(topic: &str, payload: &str) -> Prepared {
    Prepared::Bad {
        id: digest_hex(&[topic.as_bytes(), payload.as_bytes()]),
        topic: topic.to_owned(),
        error: "conflict: this symptom report id is stored with other content".into(),
        payload: payload.to_owned(),
    }
}

/// What a batch evaluates for one patient, with its position in the batch.
#[derive(Debug)]
pub(crate) enum Item<'a> {
    /// A newly stored, evaluable reading.
    Reading(&'a ReadingMessage, &'a EngineReading),
    /// A newly stored, evaluable symptom report.
    Symptoms {
        /// Its id.
        id: &'a str,
        /// Answered at (Unix s).
        answered_utc: i64,
        /// What was reported.
        symptoms: Symptoms,
    },
}

/// A stored symptom report about a reading the batch evaluates (the `symptom_reports` columns
/// `reading_id`, `id`, `patient`, `symptoms`).
#[derive(Debug)]
pub(crate) struct ReportAbout {
    /// The reading it is about.
    pub reading_id: String,
    /// The report's id.
    pub id: String,
    /// The patient it names.
    pub patient: String,
    /// What was reported.
    pub symptoms: Symptoms,
}

/// The `readings.kind` column.
pub(crate) fn kind_name(msg: &ReadingMessage) -> &'static str {
    match msg.body.kind {
        protocol::wire::Kind::Glucose => "glucose",
        protocol::wire::Kind::BloodPressure => "blood_pressure",
    }
}

/// The `symptom_reports.symptoms` column: the names, comma-separated; empty when the patient answered no.
pub(crate) fn symptoms_column(s: Symptoms) -> String {
    s.iter()
        .map(protocol::rules::Symptom::name)
        .collect::<Vec<_>>()
        .join(",")
}

/// The set a `symptom_reports.symptoms` column holds (only known names are ever stored).
pub(crate) fn symptoms_of_column(c: &str) -> Symptoms {
    let list: Vec<protocol::rules::Symptom> = c
        .split(',')
        .filter_map(protocol::rules::Symptom::from_name)
        .collect();
    Symptoms::of(&list)
}

/// The engine's inputs for one patient's `items` (in batch order). A reading takes the symptoms of the
/// stored reports about it (`reports`: the reading's patient's) that were stored before it: in an
/// earlier commit, or earlier in this batch (a report of the same patient later in `items` is left to
/// its own `on_symptoms`).
pub(crate) fn inputs<'a>(items: &[(usize, Item<'a>)], reports: &[ReportAbout]) -> Vec<Input<'a>> {
    let batch_reports: std::collections::HashMap<&str, usize> = items
        .iter()
        .filter_map(|(at, item)| match item {
            Item::Symptoms { id, .. } => Some((*id, *at)),
            Item::Reading(..) => None,
        })
        .collect();
    items
        .iter()
        .map(|(at, item)| match item {
            Item::Reading(msg, reading) => {
                let earlier: Vec<protocol::rules::Symptom> = reports
                    .iter()
                    .filter(|r| r.reading_id == msg.id && r.patient == msg.patient)
                    .filter(|r| batch_reports.get(r.id.as_str()).is_none_or(|p| p < at))
                    .flat_map(|r| r.symptoms.iter())
                    .collect();
                Input::Reading {
                    msg,
                    reading,
                    symptoms: Symptoms::of(&earlier),
                }
            }
            Item::Symptoms {
                answered_utc,
                symptoms,
                ..
            } => Input::Symptoms {
                answered_utc: *answered_utc,
                symptoms: *symptoms,
            },
        })
        .collect()
}

/// A stored reading, as the API returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReadingRow {
    /// Reading id.
    pub id: String,
    /// Patient.
    pub patient: String,
    /// Gateway.
    pub gateway: String,
    /// `glucose` or `blood_pressure`.
    pub kind: String,
    /// Measured at (Unix s).
    pub time_utc: i64,
    /// Why it was rejected (an impossible value or time, or no value to evaluate), if it was: a rejected
    /// reading is kept for inspection and never evaluated. The column is `eval_error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_error: Option<String>,
    /// The ingest instance that stored it.
    pub instance: String,
    /// The message as received.
    pub reading: serde_json::Value,
}

/// A stored alert (its latest state).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertRow {
    /// Alert id.
    pub id: String,
    /// Patient.
    pub patient: String,
    /// Rule in force.
    pub rule_id: String,
    /// Severity.
    pub severity: String,
    /// Status.
    pub status: String,
    /// Who acknowledged it, if anyone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    /// When (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_ms: Option<i64>,
    /// The engine's alert.
    pub alert: serde_json::Value,
}

/// A kept bad message (what was wrong with it, not its content), as operators and tests read it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BadRow {
    /// The topic it came on.
    pub topic: String,
    /// Why it was not stored as a reading or event.
    pub error: String,
    /// When (ms since the epoch).
    pub received_ms: i64,
}

/// An outbox row claimed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Row id.
    pub seq: i64,
    /// The alert event id (the receiver's de-duplication key).
    pub event_id: String,
    /// The notice.
    pub payload: String,
    /// Failed attempts so far.
    pub attempts: i32,
}

/// Counts, for tests, benches and the health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Counts {
    /// Readings stored.
    pub readings: i64,
    /// Alerts (episodes).
    pub alerts: i64,
    /// Alert events.
    pub alert_events: i64,
    /// Outbox rows not yet delivered.
    pub outbox_pending: i64,
    /// Outbox rows delivered.
    pub outbox_delivered: i64,
    /// Bad messages kept.
    pub bad_messages: i64,
    /// Symptom reports stored (rejected ones included).
    pub symptom_reports: i64,
    /// Events queued for the sinks (alert changes at or above the push threshold, and digests); the
    /// other alert events are stored only.
    pub notified_events: i64,
}

/// The result of acknowledging an alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckResult {
    /// Acknowledged now.
    Acknowledged,
    /// Already acknowledged before (by someone).
    Already,
    /// No such alert.
    NotFound,
}

/// Storage, as the service uses it. Every method is one transaction.
pub trait Store: Send + Sync + 'static {
    /// Stores a batch of messages in one transaction and evaluates each new reading; one [`Stored`] per
    /// message, in order. On `Err` nothing is stored and no message may be acknowledged.
    fn ingest(
        &self,
        batch: Vec<Inbound>,
        ev: Arc<Evaluator>,
        instance: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Vec<Stored>, StoreError>> + Send;

    /// Runs time-based rules for every known patient at `now_utc`; returns the alert events written.
    fn tick(
        &self,
        ev: Arc<Evaluator>,
        now_utc: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Runs the deadlines (confirmation timeouts, unacknowledged escalation) of the patients whose
    /// stored next deadline is at or before `now_utc`; returns the alert events written.
    fn deadlines(
        &self,
        ev: Arc<Evaluator>,
        now_utc: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Writes each patient's digest of `[from_utc, to_utc)`: the alerts changed in the period whose
    /// severity is below `below` (not pushed one by one), per rule, as one event queued for `sinks`.
    /// Idempotent per patient and period (deterministic event id); returns the digests written.
    fn digest(
        &self,
        from_utc: i64,
        to_utc: i64,
        below: Severity,
        sinks: Vec<Sink>,
        now_ms: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The earliest stored next deadline of any patient (whichever instance evaluated it).
    fn next_deadline(&self) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Claims up to `limit` due, undelivered rows of `sink` for `owner` until `lease_until_ms`.
    fn claim(
        &self,
        sink: Sink,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send;

    /// Marks a claimed row delivered (only if `owner` still holds it; `false` otherwise).
    fn delivered(
        &self,
        seq: i64,
        owner: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Records a failed attempt: the lease is released and the row is due again at `next_attempt_ms`.
    fn failed(
        &self,
        seq: i64,
        owner: &str,
        next_attempt_ms: i64,
        error: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores a patient's settings (the caller validated them).
    fn put_patient(
        &self,
        patient: &str,
        settings_json: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every stored patient's settings (JSON).
    fn patients(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// A patient's readings, newest first.
    fn readings_of(
        &self,
        patient: &str,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<ReadingRow>, StoreError>> + Send;

    /// One reading.
    fn reading(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ReadingRow>, StoreError>> + Send;

    /// A patient's alerts, newest first.
    fn alerts_of(
        &self,
        patient: &str,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<AlertRow>, StoreError>> + Send;

    /// Acknowledges an alert (also in the engine state, which stops its escalation).
    fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        ev: Arc<Evaluator>,
        now_ms: i64,
    ) -> impl Future<Output = Result<AckResult, StoreError>> + Send;

    /// Row counts.
    fn counts(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send;

    /// The kept bad messages, newest first.
    fn bad_messages(
        &self,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<BadRow>, StoreError>> + Send;
}

/// Either store, chosen by URL at run time.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// SQLite.
    Sqlite(SqliteStore),
    /// PostgreSQL.
    Postgres(PgStore),
}

impl AnyStore {
    /// Opens `url`: `sqlite://PATH` (or a bare path) or `postgres://…` / `postgresql://…` (or a
    /// libpq key-value string starting with `host=`). Creates the tables.
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be opened or migrated.
    pub async fn open(url: &str) -> Result<AnyStore, StoreError> {
        AnyStore::open_with(url, None).await
    }

    /// [`AnyStore::open`]; a PostgreSQL server is reached over TLS trusting the CA certificates in
    /// `postgres_ca_pem` when given (SQLite is a local file and ignores it).
    ///
    /// # Errors
    /// As [`AnyStore::open`], and [`StoreError::Tls`] for a CA file without a usable certificate.
    pub async fn open_with(
        url: &str,
        postgres_ca_pem: Option<&[u8]>,
    ) -> Result<AnyStore, StoreError> {
        if url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("host=")
        {
            let tls = postgres_ca_pem.map(postgres::postgres_tls).transpose()?;
            Ok(AnyStore::Postgres(PgStore::connect_with(url, tls).await?))
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            Ok(AnyStore::Sqlite(SqliteStore::open(path).await?))
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e.await,
            AnyStore::Postgres($s) => $e.await,
        }
    };
}

impl Store for AnyStore {
    async fn ingest(
        &self,
        batch: Vec<Inbound>,
        ev: Arc<Evaluator>,
        instance: &str,
        now_ms: i64,
    ) -> Result<Vec<Stored>, StoreError> {
        delegate!(self, s => s.ingest(batch, ev, instance, now_ms))
    }
    async fn tick(&self, ev: Arc<Evaluator>, now_utc: i64) -> Result<usize, StoreError> {
        delegate!(self, s => s.tick(ev, now_utc))
    }
    async fn deadlines(&self, ev: Arc<Evaluator>, now_utc: i64) -> Result<usize, StoreError> {
        delegate!(self, s => s.deadlines(ev, now_utc))
    }
    async fn next_deadline(&self) -> Result<Option<i64>, StoreError> {
        delegate!(self, s => s.next_deadline())
    }
    async fn digest(
        &self,
        from_utc: i64,
        to_utc: i64,
        below: Severity,
        sinks: Vec<Sink>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        delegate!(self, s => s.digest(from_utc, to_utc, below, sinks, now_ms))
    }
    async fn claim(
        &self,
        sink: Sink,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        delegate!(self, s => s.claim(sink, owner, now_ms, lease_until_ms, limit))
    }
    async fn delivered(&self, seq: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        delegate!(self, s => s.delivered(seq, owner, now_ms))
    }
    async fn failed(
        &self,
        seq: i64,
        owner: &str,
        next_attempt_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.failed(seq, owner, next_attempt_ms, error))
    }
    async fn put_patient(
        &self,
        patient: &str,
        settings_json: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.put_patient(patient, settings_json, now_ms))
    }
    async fn patients(&self) -> Result<Vec<String>, StoreError> {
        delegate!(self, s => s.patients())
    }
    async fn readings_of(&self, patient: &str, limit: i64) -> Result<Vec<ReadingRow>, StoreError> {
        delegate!(self, s => s.readings_of(patient, limit))
    }
    async fn reading(&self, id: &str) -> Result<Option<ReadingRow>, StoreError> {
        delegate!(self, s => s.reading(id))
    }
    async fn alerts_of(&self, patient: &str, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        delegate!(self, s => s.alerts_of(patient, limit))
    }
    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        ev: Arc<Evaluator>,
        now_ms: i64,
    ) -> Result<AckResult, StoreError> {
        delegate!(self, s => s.acknowledge(alert_id, by, ev, now_ms))
    }
    async fn counts(&self) -> Result<Counts, StoreError> {
        delegate!(self, s => s.counts())
    }
    async fn bad_messages(&self, limit: i64) -> Result<Vec<BadRow>, StoreError> {
        delegate!(self, s => s.bad_messages(limit))
    }
}

/// The stored severity names below `from`.
pub(crate) fn severities_below(from: Severity) -> Vec<&'static str> {
    [
        Severity::Info,
        Severity::Advisory,
        Severity::Urgent,
        Severity::Critical,
    ]
    .into_iter()
    .filter(|s| *s < from)
    .map(Severity::name)
    .collect()
}

/// A period's digest rows `(patient, item)`, sorted by patient, as one event per patient:
/// `(digest id, event id, notice)`.
pub(crate) fn digests(
    rows: Vec<(String, DigestItem)>,
    from_utc: i64,
    to_utc: i64,
) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut out = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while let Some((patient, first)) = rows.next() {
        let mut items = vec![first];
        while let Some((_, item)) = rows.next_if(|(p, _)| *p == patient) {
            items.push(item);
        }
        let (event_id, notice) = digest_notice(&patient, from_utc, to_utc, &items)?;
        out.push((format!("digest/{patient}/{to_utc}"), event_id, notice));
    }
    Ok(out)
}

/// What a clock pass runs per patient: [`Evaluator::on_tick`] or [`Evaluator::on_deadlines`].
pub(crate) type Step =
    fn(
        &Evaluator,
        &str,
        crate::evaluate::PatientEngine,
        i64,
    ) -> Result<(crate::evaluate::NewState, Vec<crate::evaluate::AlertWrite>), EvalError>;

/// The schema: versioned migrations (refinery), one directory per SQL dialect (`ingest/migrations/`):
/// applied in order at start, recorded in `refinery_schema_history`; a database that a newer ingest
/// migrated further is refused with the versions it has that this one does not know.
pub(crate) mod migrations {
    /// SQLite's.
    pub(crate) mod sqlite {
        refinery::embed_migrations!("migrations/sqlite");
    }
    /// PostgreSQL's.
    pub(crate) mod postgres {
        refinery::embed_migrations!("migrations/postgres");
    }
}
