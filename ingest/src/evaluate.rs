//! The authoritative rule evaluation: protocol's [`Engine`] run per patient, its state kept in the
//! database beside the readings.
//!
//! Several ingest instances share one stream, and a patient's readings may reach any of them, so no
//! instance can keep a patient's engine state in memory. Each evaluation instead runs inside the
//! database transaction that stores the reading: the patient's state row is locked
//! (`SELECT … FOR UPDATE` on PostgreSQL; SQLite's `BEGIN IMMEDIATE` serialises writers), the engine is
//! rebuilt from it, fed the reading, and the new state, the alerts and their outbox rows are written in
//! the same commit. A reading is evaluated exactly once because only the transaction that inserted it
//! (the unique reading id) evaluates it.
//!
//! The engine's [`EngineState`] is one map over patients; each patient's part is stored on its own row as
//! JSON (the `patients.{id}` member of the state's serde form) without the BP readings the engine keeps
//! for its window rules, which are rows of their own ([`HistoryRow`]: a batch adds and prunes a few
//! instead of rewriting days of them), beside the patient's next deadline
//! ([`NewState::next_deadline_utc`]): the time a pending confirmation is raised anyway or an
//! unacknowledged alert moves to the next tier. The service's clock sleeps until the earliest stored
//! deadline (any instance's) and runs [`Evaluator::on_deadlines`] for the patients due, so those fire at
//! their second rather than at the window-rule interval (issue 11 item 13).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError, RwLock};

use tokio::sync::Notify;

use protocol::rules::{
    Alert, AlertAction, Engine, EngineState, KeptBpReading, OverrideError, PatientSettings,
    ReadingInput, RuleSet, Severity, Symptoms,
};
use protocol::wire::ReadingMessage;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::convert::EngineReading;

/// The schema of an alert notice (webhook body and MQTT payload).
pub const ALERT_NOTICE_SCHEMA: &str = "phg.ingest.alert/1";

/// The schema of a digest notice: one patient's alerts below the push threshold over a period.
pub const DIGEST_NOTICE_SCHEMA: &str = "phg.ingest.digest/1";

/// The least severity pushed per change by default (CLINICAL.md §4.1: INFO is "none or weekly
/// summary"; §4.4: no per-reading notifications for mild excursions; issue 11 item 14).
pub const DEFAULT_NOTIFY_FROM: Severity = Severity::Advisory;

/// Where an alert notice goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sink {
    /// The MQTT alerts topic.
    Mqtt,
    /// The HTTP webhook.
    Webhook,
}

impl Sink {
    /// The name stored in the outbox.
    pub fn name(self) -> &'static str {
        match self {
            Sink::Mqtt => "mqtt",
            Sink::Webhook => "webhook",
        }
    }
}

/// An evaluation failure (the transaction is rolled back and the messages are not acknowledged).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The engine's state or a kept reading could not be written as JSON (not expected: it is the
    /// engine's own serde form). The message leaves the patient out: it is logged at ERROR (issue 11
    /// item 9). A stored row that cannot be read is not an error: see [`Evaluator::rebuild`].
    #[error("a patient's alert state could not be serialised: {source}")]
    State {
        /// The patient.
        patient: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The patient's settings were rejected by the guard-rails.
    #[error("{0}")]
    Override(Box<OverrideError>),
}

/// A patient's engine state as stored, read under the patient's lock (the `patient_state` row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredState {
    /// The `state` column: the patient's engine state without the kept BP readings (`None` or empty:
    /// none yet).
    pub json: Option<String>,
    /// The `history_rev` column: names the kept BP readings stored beside it (`bp_history`). Every write
    /// sets a new random value, so a cached engine is reused only when neither its state nor its
    /// history changed since it wrote them. `None`: a row written before the history had its own
    /// table (schema V3), whose history is inside `json`.
    pub history_rev: Option<i64>,
}

/// One kept BP reading as stored (a `bp_history` row). The engine keeps a patient's BP readings of the
/// last days for its window rules; on a row each, a batch writes the readings it added and deletes the
/// ones it pruned, instead of rewriting days of history with every state (issue 15 item 1: that
/// rewrite was most of what ingest wrote).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// The reading's id.
    pub reading_id: String,
    /// When it was measured (Unix s).
    pub time_utc: i64,
    /// The order among readings of equal time: ascending in the order they were kept.
    pub seq: i64,
    /// The engine's form of the entry (JSON).
    pub entry: String,
}

/// A patient's engine, ready to evaluate: the one this instance left behind, or one rebuilt from the
/// stored state and history ([`Evaluator::cached`], [`Evaluator::rebuild`]).
#[derive(Debug)]
pub struct PatientEngine {
    engine: Engine,
    /// The ids of the kept BP readings stored in `bp_history`: the next write adds the others and
    /// deletes those the engine pruned.
    stored_ids: HashSet<String>,
    /// The largest `seq` stored for the patient.
    max_seq: i64,
}

/// A stored row [`Evaluator::rebuild`] could not read and left out.
#[derive(Debug)]
pub struct Unreadable {
    /// `patient_state` or `bp_history`.
    pub table: &'static str,
    /// Why (it may quote the row: for the database, not for logs).
    pub error: serde_json::Error,
    /// The row's text, kept for inspection.
    pub text: String,
}

/// A patient's engine state after an evaluation, to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewState {
    /// The state without the kept BP readings (the `patient_state.state` column).
    pub json: String,
    /// When time alone next changes it (Unix s; the `patient_state.next_deadline_utc` column): a
    /// pending confirmation's timeout or an acknowledgement deadline. `None` when nothing waits.
    pub next_deadline_utc: Option<i64>,
    /// The new `patient_state.history_rev`.
    pub history_rev: i64,
    /// Kept BP readings to add to `bp_history`.
    pub history_added: Vec<HistoryRow>,
    /// Reading ids to delete from `bp_history` (pruned by the engine).
    pub history_removed: Vec<String>,
}

/// One alert change to write: the alert row, its event, the outbox rows.
#[derive(Debug, Clone)]
pub struct AlertWrite {
    /// The alert after the change.
    pub alert: Alert,
    /// The alert as JSON (the `alerts.body` column).
    pub alert_json: String,
    /// `open`, `escalate`, `confirm`, `downgrade` or `close`.
    pub action: &'static str,
    /// Deterministic event id (unique: a replayed evaluation writes nothing new).
    pub event_id: String,
    /// The notice delivered to every sink.
    pub notice: String,
    /// `false`: stored (alerts, alert_events) but not pushed to the sinks one by one; it reaches the
    /// care team in the patient's digest instead ([`Evaluator::notify_from`]).
    pub notify: bool,
}

/// The alert notice: what the webhook and the MQTT alerts topic carry.
#[derive(Debug, Serialize)]
struct Notice<'a> {
    schema: &'static str,
    /// The event id: a receiver de-duplicates on it (delivery is at least once).
    event_id: &'a str,
    action: &'static str,
    /// Why (escalation reason, confirmation, close reason, downgrade's previous severity).
    #[serde(skip_serializing_if = "Value::is_null")]
    detail: Value,
    alert: &'a Alert,
}

/// One thing a batch evaluates for a patient ([`Evaluator::on_inputs`]).
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A newly stored reading, with the symptoms of the reports about it stored before it (a report
    /// that reached ingest before its reading: see [`crate::store`]).
    Reading {
        /// The message.
        msg: &'a ReadingMessage,
        /// The engine's view of it.
        reading: &'a EngineReading,
        /// Symptoms reported about it earlier; usually none.
        symptoms: Symptoms,
    },
    /// A newly stored symptom report: the engine's `on_symptoms` at the answer time (CLINICAL.md §4.2:
    /// symptoms skip confirmation).
    Symptoms {
        /// When the patient answered (Unix s).
        answered_utc: i64,
        /// What they reported.
        symptoms: Symptoms,
    },
}

/// The rules and the patients' settings; evaluates readings against a patient's stored state.
#[derive(Debug)]
pub struct Evaluator {
    rules: RuleSet,
    /// Validated settings by patient. A `std` lock: held for a clone, never across an await.
    patients: RwLock<HashMap<String, PatientSettings>>,
    sinks: Vec<Sink>,
    notify_from: Severity,
    /// The engine last used per patient, with the state it left behind. Reused only when the stored
    /// state is exactly that (the same text and history revision: another instance's change, or a
    /// rolled-back transaction, is never missed); it saves reading the history and parsing the state
    /// for every batch. A `std` lock, held only to take or put an entry.
    cache: Mutex<HashMap<String, (StoredState, PatientEngine)>>,
    /// The earliest deadline this instance's evaluations set since the clock last looked
    /// ([`Evaluator::take_deadline_hint`]), and a signal to wake the clock for it. A hint, not the truth:
    /// the transaction that set it may still be open or roll back; the clock runs whatever the
    /// database says is due when the time comes. A `std` lock, held to read or replace one number.
    hint: Mutex<Option<i64>>,
    changed: Notify,
}

/// Engines kept at most (the cache is emptied when full).
const CACHE_MAX: usize = 10_000;

impl Evaluator {
    /// An evaluator for `rules`, delivering to `sinks`.
    pub fn new(rules: RuleSet, sinks: Vec<Sink>) -> Evaluator {
        Evaluator {
            rules,
            patients: RwLock::new(HashMap::new()),
            sinks,
            notify_from: DEFAULT_NOTIFY_FROM,
            cache: Mutex::new(HashMap::new()),
            hint: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// The earliest deadline evaluations set since the last call (and forgets it).
    pub fn take_deadline_hint(&self) -> Option<i64> {
        self.hint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Completes when an evaluation set a deadline after the last [`Evaluator::take_deadline_hint`]
    /// (at once if one did since the last wait).
    pub async fn deadline_set(&self) {
        self.changed.notified().await;
    }

    fn new_state(&self, pe: PatientEngine, patient: &str) -> Result<NewState, EvalError> {
        let PatientEngine {
            mut engine,
            mut stored_ids,
            mut max_seq,
        } = pe;
        let err = |e| EvalError::State {
            patient: patient.into(),
            source: e,
        };
        // The state is stored without the history, which changes by rows of its own.
        let history = engine.take_bp_history(patient);
        let json = Self::state_of(&engine, patient);
        let kept: HashSet<&str> = history.iter().map(KeptBpReading::reading_id).collect();
        let history_removed: Vec<String> = stored_ids
            .iter()
            .filter(|id| !kept.contains(id.as_str()))
            .cloned()
            .collect();
        let mut history_added = Vec::new();
        for k in history
            .iter()
            .filter(|k| !stored_ids.contains(k.reading_id()))
        {
            max_seq += 1;
            history_added.push(HistoryRow {
                reading_id: k.reading_id().to_owned(),
                time_utc: k.time_utc(),
                seq: max_seq,
                entry: serde_json::to_string(k).map_err(err)?,
            });
        }
        // After this write the rows are the kept readings.
        stored_ids.retain(|id| kept.contains(id.as_str()));
        drop(kept);
        stored_ids.extend(history_added.iter().map(|r| r.reading_id.clone()));
        engine.put_bp_history(patient, history);
        let json = json?;
        let history_rev: i64 = rand::random();
        let next_deadline_utc = engine.next_deadline();
        if let Some(d) = next_deadline_utc {
            let mut hint = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
            if hint.is_none_or(|h| d < h) {
                *hint = Some(d);
                drop(hint);
                // `notify_one` keeps a permit when the clock is not waiting yet: the hint is not lost.
                self.changed.notify_one();
            }
        }
        let stored = StoredState {
            json: Some(json.clone()),
            history_rev: Some(history_rev),
        };
        let pe = PatientEngine {
            engine,
            stored_ids,
            max_seq,
        };
        self.keep(patient, stored, pe);
        Ok(NewState {
            json,
            next_deadline_utc,
            history_rev,
            history_added,
            history_removed,
        })
    }

    /// The sinks every notified alert event (and every digest) is queued for.
    pub fn sinks(&self) -> &[Sink] {
        &self.sinks
    }

    /// Pushes alert changes one by one from `severity` up ([`DEFAULT_NOTIFY_FROM`] unless set); those
    /// below are stored and summarised in digests.
    pub fn with_notify_from(mut self, severity: Severity) -> Evaluator {
        self.notify_from = severity;
        self
    }

    /// The least severity pushed per change.
    pub fn notify_from(&self) -> Severity {
        self.notify_from
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Sets (replaces) a patient's settings after checking the guard-rails.
    ///
    /// # Errors
    /// The override error; the previous settings stay.
    pub fn set_patient(&self, settings: PatientSettings) -> Result<(), Box<OverrideError>> {
        let s = settings.validated(&self.rules).map_err(Box::new)?;
        let mut map = self
            .patients
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&s.patient);
        map.insert(s.patient.clone(), s);
        Ok(())
    }

    fn settings(&self, patient: &str) -> Vec<PatientSettings> {
        let map = self.patients.read().unwrap_or_else(PoisonError::into_inner);
        map.get(patient).cloned().into_iter().collect()
    }

    /// The patients with settings.
    pub fn patients(&self) -> Vec<String> {
        let map = self.patients.read().unwrap_or_else(PoisonError::into_inner);
        map.keys().cloned().collect()
    }

    fn keep(&self, patient: &str, stored: StoredState, engine: PatientEngine) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(patient.to_owned(), (stored, engine));
    }

    /// The engine this instance left behind for `patient`, taken from the cache, when `stored` is
    /// exactly what it wrote; `None` otherwise: read the patient's history and [`Self::rebuild`] it.
    pub fn cached(&self, patient: &str, stored: &StoredState) -> Option<PatientEngine> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match cache.remove(patient) {
            Some((s, e)) if s == *stored => Some(e),
            _ => None,
        }
    }

    /// The patient's engine from its stored state and its `bp_history` rows (any order), and what of
    /// them it could not read. An unreadable state or history row is left out, not fatal: the engine
    /// goes on without it (a fresh state, or the history without that reading) and its next write
    /// replaces the state and deletes the row. Refusing it instead would leave the batch unacknowledged
    /// and redelivered for ever, and every other patient's readings in it unstored — one damaged row
    /// would stop ingest — while a fresh state still raises every single-reading alert.
    ///
    /// # Errors
    /// [`EvalError::Override`] when the patient's settings are invalid.
    pub fn rebuild(
        &self,
        patient: &str,
        stored: &StoredState,
        mut history: Vec<HistoryRow>,
    ) -> Result<(PatientEngine, Vec<Unreadable>), EvalError> {
        let mut unreadable = Vec::new();
        let state = match stored.json.as_deref().filter(|s| !s.is_empty()) {
            None => EngineState::default(),
            Some(s) => match parse_state(patient, s) {
                Ok(state) => state,
                Err(error) => {
                    unreadable.push(Unreadable {
                        table: "patient_state",
                        error,
                        text: s.to_owned(),
                    });
                    EngineState::default()
                }
            },
        };
        let mut engine = Engine::with_state(self.rules.clone(), self.settings(patient), state)
            .map_err(|e| EvalError::Override(Box::new(e)))?;
        let stored_ids: HashSet<String> = history.iter().map(|r| r.reading_id.clone()).collect();
        let max_seq = history.iter().map(|r| r.seq).max().unwrap_or(0);
        // A state written before V3 holds its history itself; the first write moves it to rows.
        let inline = engine.take_bp_history(patient);
        let kept = if inline.is_empty() && stored.history_rev.is_some() {
            history.sort_by_key(|r| (r.time_utc, r.seq));
            let mut kept = Vec::with_capacity(history.len());
            for r in history {
                match serde_json::from_str::<KeptBpReading>(&r.entry) {
                    Ok(k) => kept.push(k),
                    Err(error) => unreadable.push(Unreadable {
                        table: "bp_history",
                        error,
                        text: r.entry,
                    }),
                }
            }
            kept
        } else {
            inline
        };
        engine.put_bp_history(patient, kept);
        let engine = PatientEngine {
            engine,
            stored_ids,
            max_seq,
        };
        Ok((engine, unreadable))
    }

    fn state_of(engine: &Engine, patient: &str) -> Result<String, EvalError> {
        let err = |e| EvalError::State {
            patient: patient.into(),
            source: e,
        };
        // Straight to text (a `Value` tree first costs twice the time): the engine holds this patient
        // only, so the text is `{"patients":{"<patient>":<part>}}`; anything else takes the general way.
        let text = serde_json::to_string(engine.state()).map_err(err)?;
        let prefix = state_prefix(patient).map_err(err)?;
        if let Some(part) = text
            .strip_prefix(prefix.as_str())
            .and_then(|t| t.strip_suffix("}}"))
            .filter(|part| json_value_end(part) == Some(part.len()))
        {
            return Ok(part.to_owned());
        }
        if text == r#"{"patients":{}}"# {
            return Ok("{}".to_owned());
        }
        let mut v: Value = serde_json::from_str(&text).map_err(err)?;
        let part = v
            .get_mut("patients")
            .and_then(|p| p.get_mut(patient))
            .map(Value::take)
            .unwrap_or(Value::Object(Map::new()));
        serde_json::to_string(&part).map_err(err)
    }

    /// Evaluates one patient's stored readings and symptom reports, in arrival order, with the patient's
    /// engine (one engine, one state serialisation: a gateway catching up after days offline sends a
    /// patient's readings together). Returns the new state and the alert changes per input.
    ///
    /// # Errors
    /// [`EvalError::State`] when the new state cannot be serialised.
    pub fn on_inputs(
        &self,
        patient: &str,
        mut pe: PatientEngine,
        inputs: &[Input<'_>],
    ) -> Result<(NewState, Vec<Vec<AlertWrite>>), EvalError> {
        let engine = &mut pe.engine;
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            let actions = match input {
                Input::Reading {
                    msg,
                    reading,
                    symptoms,
                } => engine.on_reading(&ReadingInput {
                    patient,
                    reading_id: &msg.id,
                    time_utc: reading.time_utc,
                    measurement: &reading.measurement,
                    verdict: &reading.verdict,
                    symptoms: *symptoms,
                }),
                // The engine's state is per patient; a report is only ever about its own patient.
                Input::Symptoms {
                    answered_utc,
                    symptoms,
                } => engine
                    .on_symptoms(patient, *answered_utc, *symptoms)
                    .into_iter()
                    .filter(|a| a.alert().patient == patient)
                    .collect(),
            };
            out.push(writes(&actions, self.notify_from)?);
        }
        Ok((self.new_state(pe, patient)?, out))
    }

    /// Time passes for one patient (confirmation timeouts, escalation, window rules, adherence).
    ///
    /// # Errors
    /// As [`Self::on_inputs`].
    pub fn on_tick(
        &self,
        patient: &str,
        pe: PatientEngine,
        now_utc: i64,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        self.advance(patient, pe, now_utc, Engine::on_tick)
    }

    /// A patient's deadlines due at `now_utc` (confirmation timeouts, unacknowledged escalation),
    /// without the window rules.
    ///
    /// # Errors
    /// As [`Self::on_inputs`].
    pub fn on_deadlines(
        &self,
        patient: &str,
        pe: PatientEngine,
        now_utc: i64,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        self.advance(patient, pe, now_utc, Engine::on_deadlines)
    }

    fn advance(
        &self,
        patient: &str,
        mut pe: PatientEngine,
        now_utc: i64,
        step: impl FnOnce(&mut Engine, i64) -> Vec<AlertAction>,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        let actions: Vec<AlertAction> = step(&mut pe.engine, now_utc)
            .into_iter()
            .filter(|a| a.alert().patient == patient)
            .collect();
        Ok((
            self.new_state(pe, patient)?,
            writes(&actions, self.notify_from)?,
        ))
    }

    /// Marks an alert acknowledged in the patient's state (stops its unacknowledged escalation).
    /// Returns the new state; `false` when the alert is not open in the state.
    ///
    /// # Errors
    /// As [`Self::on_inputs`].
    pub fn acknowledge(
        &self,
        patient: &str,
        mut pe: PatientEngine,
        alert_id: &str,
    ) -> Result<(NewState, bool), EvalError> {
        let open = pe.engine.acknowledge(patient, alert_id);
        Ok((self.new_state(pe, patient)?, open))
    }
}

/// A patient's stored state row (its part of the engine's serde form) as the engine's state.
fn parse_state(patient: &str, s: &str) -> Result<EngineState, serde_json::Error> {
    // The row must be one JSON value (checked first: the text is spliced into the engine's serde form
    // below, parsed in one pass rather than through a `Value` tree).
    if json_value_end(s) != Some(s.trim_end().len()) {
        return Err(serde_json::from_str::<Value>(s)
            .err()
            .unwrap_or_else(|| serde::de::Error::custom("not one JSON value")));
    }
    serde_json::from_str(&format!("{}{s}}}}}", state_prefix(patient)?))
}

/// `{"patients":{"<patient>":`, the start of the engine state's serde form for one patient.
fn state_prefix(patient: &str) -> Result<String, serde_json::Error> {
    let key = serde_json::to_string(patient)?;
    Ok(format!(r#"{{"patients":{{{key}:"#))
}

/// Where the first JSON value of `s` ends (its length in bytes, leading whitespace included), found
/// by matching brackets outside strings; `None` when `s` does not start with a complete object or
/// array. Not a validator: serde parses the value afterwards; this only tells one value from several.
fn json_value_end(s: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, b) in s.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

fn action_name(a: &AlertAction) -> &'static str {
    match a {
        AlertAction::Open(_) => "open",
        AlertAction::Escalate { .. } => "escalate",
        AlertAction::Confirm { .. } => "confirm",
        AlertAction::Downgrade { .. } => "downgrade",
        AlertAction::Close { .. } => "close",
    }
}

/// Deterministic: the same transition of the same alert always gets the same id.
///
/// 32 hex digits: the transition's time (`updated_utc`, 12 digits) and then 80 bits of a SHA-256 over
/// the transition. The time first makes the ids ascend as readings arrive, so `alert_events`' key and
/// the outbox's `(event_id, sink)` key grow at their right edge: a batch's events share a few index
/// pages instead of dirtying a random leaf each (on SQLite every dirtied page is a WAL frame at commit).
fn event_id(alert: &Alert, action: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        alert.id.as_str(),
        action,
        &alert.updated_utc.to_string(),
        alert.severity.name(),
        &format!("{:?}", alert.status),
        &alert.tier.to_string(),
        &alert.rule_id,
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    // A time before 1970 (never a real transition) sorts first rather than wrapping.
    let time = u64::try_from(alert.updated_utc).unwrap_or(0) & 0xffff_ffff_ffff;
    format!(
        "{time:012x}{}",
        protocol::wire::to_hex(h.finalize().get(..10).unwrap_or_default())
    )
}

/// Whether a change is pushed on its own: the alert is at least `from`, or it was before (a pending
/// URGENT downgraded to INFO by an in-range repeat is news to whoever saw it open).
fn notified(action: &AlertAction, from: Severity) -> bool {
    let before = match action {
        AlertAction::Downgrade { from: f, .. } => Some(*f),
        _ => None,
    };
    action.alert().severity >= from || before.is_some_and(|b| b >= from)
}

fn writes(actions: &[AlertAction], notify_from: Severity) -> Result<Vec<AlertWrite>, EvalError> {
    let err = |e| EvalError::State {
        patient: String::new(),
        source: e,
    };
    actions
        .iter()
        .map(|a| {
            let alert = a.alert();
            let action = action_name(a);
            let event_id = event_id(alert, action);
            let detail = match a {
                AlertAction::Open(_) => Value::Null,
                AlertAction::Escalate { reason, .. } => {
                    serde_json::json!({ "reason": serde_json::to_value(reason).map_err(err)? })
                }
                AlertAction::Confirm { by, .. } => {
                    serde_json::json!({ "by": serde_json::to_value(by).map_err(err)? })
                }
                AlertAction::Downgrade { from, .. } => serde_json::json!({ "from": from.name() }),
                AlertAction::Close { reason, .. } => {
                    serde_json::json!({ "reason": serde_json::to_value(reason).map_err(err)? })
                }
            };
            let notice = serde_json::to_string(&Notice {
                schema: ALERT_NOTICE_SCHEMA,
                event_id: &event_id,
                action,
                detail,
                alert,
            })
            .map_err(err)?;
            Ok(AlertWrite {
                alert: alert.clone(),
                alert_json: serde_json::to_string(alert).map_err(err)?,
                action,
                event_id,
                notice,
                notify: notified(a, notify_from),
            })
        })
        .collect()
}

/// One line of a digest: a rule's alerts below the push threshold in the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DigestItem {
    /// The rule.
    pub rule_id: String,
    /// Its severity (as stored).
    pub severity: String,
    /// Alerts (episodes) changed in the period.
    pub alerts: i64,
    /// The first one opened at (Unix s).
    pub first_utc: i64,
    /// The last change at (Unix s).
    pub last_utc: i64,
}

#[derive(Debug, Serialize)]
struct DigestNotice<'a> {
    schema: &'static str,
    event_id: &'a str,
    action: &'static str,
    patient: &'a str,
    /// The period, `[from_utc, to_utc)`, Unix s.
    from_utc: i64,
    to_utc: i64,
    items: &'a [DigestItem],
}

/// A patient's digest for `[from_utc, to_utc)`: (event id, notice). The id is deterministic, so every
/// instance and every retry of the same period writes one event.
///
/// # Errors
/// When the notice cannot be serialised.
pub fn digest_notice(
    patient: &str,
    from_utc: i64,
    to_utc: i64,
    items: &[DigestItem],
) -> Result<(String, String), serde_json::Error> {
    let mut h = Sha256::new();
    for part in [
        "digest",
        patient,
        &from_utc.to_string(),
        &to_utc.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let event_id = protocol::wire::to_hex(h.finalize().get(..16).unwrap_or_default());
    let notice = serde_json::to_string(&DigestNotice {
        schema: DIGEST_NOTICE_SCHEMA,
        event_id: &event_id,
        action: "digest",
        patient,
        from_utc,
        to_utc,
        items,
    })?;
    Ok((event_id, notice))
}

/// The digest period that ended last at or before `now_utc`: `[end − every, end)`, periods aligned to
/// multiples of `every` since the Unix epoch (UTC).
pub fn last_digest_period(now_utc: i64, every_s: i64) -> (i64, i64) {
    let every = every_s.max(1);
    let end = now_utc - now_utc.rem_euclid(every);
    (end - every, end)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::store::{Channel, Inbound, Prepared, prepare};
    use crate::testing::{TEST_GATEWAY, bp_message};

    const T0: i64 = 1_795_420_800;

    fn evaluator() -> Evaluator {
        Evaluator::new(RuleSet::default_rules().expect("rules"), vec![Sink::Mqtt])
    }

    /// A patient's rows as a store keeps them: the state row and the `bp_history` rows.
    #[derive(Debug, Default, Clone)]
    struct Rows {
        state: StoredState,
        history: BTreeMap<String, HistoryRow>,
    }

    impl Rows {
        /// What a store does with a new state: the row replaced, pruned history rows deleted, new ones
        /// inserted.
        fn write(&mut self, new: &NewState) {
            self.state = StoredState {
                json: Some(new.json.clone()),
                history_rev: Some(new.history_rev),
            };
            for id in &new.history_removed {
                assert!(self.history.remove(id).is_some(), "{id} was not stored");
            }
            for r in &new.history_added {
                assert!(
                    self.history
                        .insert(r.reading_id.clone(), r.clone())
                        .is_none(),
                    "{} stored twice",
                    r.reading_id
                );
            }
        }

        /// The engine as a batch gets it: `ev`'s cached one, or rebuilt from the rows.
        fn engine(&self, ev: &Evaluator, patient: &str) -> PatientEngine {
            ev.cached(patient, &self.state).unwrap_or_else(|| {
                let rows = self.history.values().rev().cloned().collect();
                ev.rebuild(patient, &self.state, rows).expect("rebuilt").0
            })
        }
    }

    /// Evaluates a blood-pressure reading of `patient` at `t` as a batch would, and stores the result
    /// in `rows`. Returns the new state and the alert changes.
    fn bp(
        ev: &Evaluator,
        patient: &str,
        rows: &mut Rows,
        t: i64,
        sys: u32,
    ) -> (NewState, Vec<AlertWrite>) {
        let m = Inbound {
            topic: format!("phg/v1/{TEST_GATEWAY}/readings"),
            channel: Channel::Readings,
            payload: bp_message(&format!("r-{t}"), patient, sys, 80, 70, t).into_bytes(),
            max_len: None,
        };
        let Prepared::Reading { msg, engine, .. } = prepare(&m) else {
            panic!("not a reading");
        };
        let reading = engine.expect("evaluable");
        let input = Input::Reading {
            msg: &msg,
            reading: &reading,
            symptoms: Symptoms::NONE,
        };
        let pe = rows.engine(ev, patient);
        let (new, mut writes) = ev.on_inputs(patient, pe, &[input]).expect("evaluated");
        rows.write(&new);
        (new, writes.pop().unwrap_or_default())
    }

    /// What two evaluations must agree on (the revision is random).
    fn same(a: &(NewState, Vec<AlertWrite>), b: &(NewState, Vec<AlertWrite>)) {
        let key = |(n, w): &(NewState, Vec<AlertWrite>)| {
            (
                n.json.clone(),
                n.next_deadline_utc,
                n.history_added.clone(),
                n.history_removed.clone(),
                w.iter().map(|w| w.notice.clone()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(key(a), key(b));
    }

    /// Event ids are the de-duplication key of every sink: the same transition gets the same id in any
    /// instance, and later transitions sort after earlier ones (so the keys grow at their right edge).
    #[test]
    fn event_ids_are_deterministic_and_ascend_with_the_transitions_time() {
        let run = || {
            let ev = evaluator();
            let mut rows = Rows::default();
            [185, 186, 120, 190]
                .into_iter()
                .enumerate()
                .flat_map(|(i, sys)| {
                    let t = T0 + 600 * i64::try_from(i).unwrap_or(0);
                    bp(&ev, "p-1", &mut rows, t, sys).1
                })
                .map(|w| (w.alert.updated_utc, w.event_id))
                .collect::<Vec<_>>()
        };
        let ids = run();
        assert!(ids.len() >= 2, "raised, then confirmed: {ids:?}");
        assert_eq!(ids, run(), "the same transitions, the same ids");
        for (t, id) in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            assert_eq!(i64::from_str_radix(&id[..12], 16).ok(), Some(*t), "{id}");
        }
        for pair in ids.windows(2) {
            if pair[0].0 < pair[1].0 {
                assert!(pair[0].1 < pair[1].1, "{pair:?}");
            }
        }
        let distinct: BTreeSet<_> = ids.iter().map(|(_, id)| id).collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn a_value_ends_where_its_brackets_close_outside_strings() {
        assert_eq!(json_value_end(r#"{"a":"}]\"{"}"#), Some(13));
        assert_eq!(json_value_end(r#" {"a":1},"b":{}"#), Some(8));
        assert_eq!(json_value_end("[[]]  "), Some(4));
        assert_eq!(json_value_end("null"), None);
        assert_eq!(json_value_end(r#""{}""#), None);
        assert_eq!(json_value_end("{"), None);
        assert_eq!(json_value_end("}"), None);
    }

    /// The state row is the patient's part of the engine state without its BP history, which is stored
    /// a row per kept reading; an instance that never saw the patient rebuilds the same engine from them.
    #[test]
    fn a_stored_state_and_its_history_rows_read_back_as_the_same_engine() {
        let (a, b) = (evaluator(), evaluator());
        let mut rows = Rows::default();
        for i in 0..5 {
            bp(&a, "p-0001", &mut rows, T0 + i * 600, 120 + i as u32);
        }
        let part: Value =
            serde_json::from_str(&rows.state.json.clone().unwrap()).expect("one value");
        assert_eq!(part.get("bp"), Some(&Value::Array(Vec::new())), "{part}");
        assert!(
            !rows
                .state
                .json
                .as_deref()
                .unwrap_or("")
                .contains("patients")
        );
        assert_eq!(rows.history.len(), 5, "a row per kept reading");
        let seqs: BTreeSet<i64> = rows.history.values().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 5, "distinct seqs");
        // `a` continues from its cached engine, `b` rebuilds from the rows: the same next state and
        // alert (a crisis value, raised against the history).
        let t = T0 + 3_000;
        let mut rows_b = rows.clone();
        let from_cache = bp(&a, "p-0001", &mut rows, t, 190);
        let rebuilt = bp(&b, "p-0001", &mut rows_b, t, 190);
        assert!(!from_cache.1.is_empty(), "190 mmHg raises an alert");
        same(&from_cache, &rebuilt);
        assert_eq!(
            from_cache.0.history_added.len(),
            1,
            "only the new reading is written"
        );
    }

    /// A cached engine is reused only when the row is exactly what it wrote: another instance's write
    /// with the same state text but another history revision (a reading that changed the history
    /// alone) makes it rebuild.
    #[test]
    fn a_cached_engine_is_not_used_when_the_history_revision_changed() {
        let ev = evaluator();
        let mut rows = Rows::default();
        bp(&ev, "p-0001", &mut rows, T0, 120);
        let mut other = rows.state.clone();
        other.history_rev = other.history_rev.map(|r| r.wrapping_add(1));
        assert!(ev.cached("p-0001", &other).is_none());
        bp(&ev, "p-0001", &mut rows, T0 + 600, 121);
        assert!(ev.cached("p-0001", &rows.state).is_some());
    }

    /// A state written before V3 holds its history inside; it continues exactly as one stored in rows,
    /// and its first write moves the whole history to rows.
    #[test]
    fn a_state_with_its_history_inside_continues_and_moves_it_to_rows() {
        let ev = evaluator();
        let mut rows = Rows::default();
        for i in 0..4 {
            bp(&ev, "p-0001", &mut rows, T0 + i * 600, 150 + i as u32);
        }
        // The same state as the previous version wrote it: the entries inside, no revision, no rows.
        let mut part: Value = serde_json::from_str(rows.state.json.as_deref().unwrap()).unwrap();
        let entries: Vec<Value> = rows
            .history
            .values()
            .map(|r| serde_json::from_str(&r.entry).unwrap())
            .collect();
        part["bp"] = Value::Array(entries);
        let mut legacy = Rows {
            state: StoredState {
                json: Some(part.to_string()),
                history_rev: None,
            },
            history: BTreeMap::new(),
        };
        let t = T0 + 4 * 600;
        let split = bp(&evaluator(), "p-0001", &mut rows, t, 185);
        let moved = bp(&evaluator(), "p-0001", &mut legacy, t, 185);
        assert_eq!(split.0.json, moved.0.json);
        assert_eq!(
            split.1.iter().map(|w| &w.notice).collect::<Vec<_>>(),
            moved.1.iter().map(|w| &w.notice).collect::<Vec<_>>()
        );
        assert_eq!(moved.0.history_added.len(), 5, "four moved, one new");
        assert_eq!(
            legacy.history.keys().collect::<Vec<_>>(),
            rows.history.keys().collect::<Vec<_>>()
        );
    }

    /// Readings older than the engine keeps are deleted from the rows, not left behind.
    #[test]
    fn pruned_history_rows_are_deleted() {
        let ev = evaluator();
        let mut rows = Rows::default();
        // More old readings than any `of_last` rule keeps regardless of age.
        let early = T0 - ev.rules().history_s() - 86_400;
        for i in 0..30 {
            bp(&ev, "p-0001", &mut rows, early + i * 600, 120);
        }
        let (new, _) = bp(&ev, "p-0001", &mut rows, T0, 122);
        assert!(!new.history_removed.is_empty(), "{new:?}");
        assert_eq!(
            rows.history.len(),
            31 - new.history_removed.len(),
            "the rows are what the engine keeps"
        );
        let rebuilt = ev
            .rebuild(
                "p-0001",
                &rows.state,
                rows.history.values().cloned().collect(),
            )
            .expect("rebuilt");
        assert_eq!(rebuilt.0.stored_ids.len(), rows.history.len());
        assert!(rows.history.contains_key(&new.history_added[0].reading_id));
    }

    /// An unreadable state row or history row is left out and reported, never fatal: the engine
    /// evaluates without it (a fresh state; the history without that reading).
    #[test]
    fn unreadable_rows_are_left_out_and_reported() {
        for bad in [
            "{} {}",
            "{\"bp\":[]},{}",
            "[",
            "null",
            "7",
            "{\"episodes\":7}",
        ] {
            let stored = StoredState {
                json: Some(bad.into()),
                history_rev: None,
            };
            let (_, unreadable) = evaluator()
                .rebuild("p-0001", &stored, Vec::new())
                .expect("rebuilt");
            let tables: Vec<&str> = unreadable.iter().map(|u| u.table).collect();
            assert_eq!(tables, ["patient_state"], "{bad}");
            assert_eq!(unreadable[0].text, bad);
        }
        // A history with one damaged row: the others are kept, and the damaged one is deleted by the
        // next write (its id is among the stored ones, not among the kept).
        let ev = evaluator();
        let mut rows = Rows::default();
        for i in 0..3 {
            bp(&ev, "p-0001", &mut rows, T0 + i * 600, 120);
        }
        let damaged = rows.history.keys().next().cloned().expect("a row");
        if let Some(r) = rows.history.get_mut(&damaged) {
            r.entry = "{".into();
        }
        let fresh = evaluator();
        let (engine, unreadable) = fresh
            .rebuild(
                "p-0001",
                &rows.state,
                rows.history.values().cloned().collect(),
            )
            .expect("rebuilt");
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable[0].table, "bp_history");
        let (new, _) = fresh.on_inputs("p-0001", engine, &[]).expect("evaluated");
        assert_eq!(new.history_removed, vec![damaged]);
        assert!(new.history_added.is_empty());
        let fine = StoredState {
            json: Some(" {} ".into()),
            history_rev: Some(1),
        };
        let (_, none) = evaluator()
            .rebuild("p-0001", &fine, Vec::new())
            .expect("rebuilt");
        assert!(none.is_empty());
    }
}
