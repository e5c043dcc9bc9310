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
//! JSON (the `patients.{id}` member of the state's serde form), beside the patient's next deadline
//! ([`NewState::next_deadline_utc`]): the time a pending confirmation is raised anyway or an
//! unacknowledged alert moves to the next tier. The service's clock sleeps until the earliest stored
//! deadline (any instance's) and runs [`Evaluator::on_deadlines`] for the patients due, so those fire at
//! their second rather than at the window-rule interval (issue 11 item 13).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, RwLock};

use tokio::sync::Notify;

use protocol::rules::{
    Alert, AlertAction, Engine, EngineState, OverrideError, PatientSettings, ReadingInput, RuleSet,
    Severity, Symptoms,
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
    /// A stored state row is not the engine's state (written by an incompatible version). The message
    /// leaves the patient out: it is logged at ERROR (issue 11 item 9).
    #[error("a patient's stored alert state is unreadable: {source}")]
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

/// A patient's engine state after an evaluation, to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewState {
    /// The state (the `patient_state.state` column).
    pub json: String,
    /// When time alone next changes it (Unix s; the `patient_state.next_deadline_utc` column): a
    /// pending confirmation's timeout or an acknowledgement deadline. `None` when nothing waits.
    pub next_deadline_utc: Option<i64>,
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
    /// state is exactly that string (so another instance's change, or a rolled-back transaction, is
    /// never missed); it saves rebuilding the rules and parsing the state for every reading. A `std`
    /// lock, held only to take or put an entry.
    cache: Mutex<HashMap<String, (String, Engine)>>,
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

    fn new_state(&self, engine: Engine, patient: &str) -> Result<NewState, EvalError> {
        let json = Self::state_of(&engine, patient)?;
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
        self.keep(patient, &json, engine);
        Ok(NewState {
            json,
            next_deadline_utc,
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

    fn keep(&self, patient: &str, state: &str, engine: Engine) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(patient.to_owned(), (state.to_owned(), engine));
    }

    fn engine(&self, patient: &str, state: Option<&str>) -> Result<Engine, EvalError> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(patient);
        if let Some((s, e)) = cached
            && state == Some(s.as_str())
        {
            return Ok(e);
        }
        let state = match state.filter(|s| !s.is_empty()) {
            None => EngineState::default(),
            Some(s) => {
                let err = |e| EvalError::State {
                    patient: patient.into(),
                    source: e,
                };
                // The row must be one JSON value (checked first: the text is spliced into the engine's
                // serde form below, parsed in one pass rather than through a `Value` tree).
                if json_value_end(s) != Some(s.trim_end().len()) {
                    return Err(err(serde_json::from_str::<Value>(s)
                        .err()
                        .unwrap_or_else(|| serde::de::Error::custom("not one JSON value"))));
                }
                serde_json::from_str(&format!("{}{s}}}}}", state_prefix(patient)?)).map_err(err)?
            }
        };
        Engine::with_state(self.rules.clone(), self.settings(patient), state)
            .map_err(|e| EvalError::Override(Box::new(e)))
    }

    fn state_of(engine: &Engine, patient: &str) -> Result<String, EvalError> {
        let err = |e| EvalError::State {
            patient: patient.into(),
            source: e,
        };
        // Straight to text (a `Value` tree first costs twice the time): the engine holds this patient
        // only, so the text is `{"patients":{"<patient>":<part>}}`; anything else takes the general way.
        let text = serde_json::to_string(engine.state()).map_err(err)?;
        let prefix = state_prefix(patient)?;
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

    /// Evaluates one stored reading against the patient's `state` (JSON, `None` for a new patient).
    /// Returns the new state and the alert changes.
    ///
    /// # Errors
    /// [`EvalError`] when the state is unreadable or the settings invalid.
    pub fn on_reading(
        &self,
        state: Option<&str>,
        msg: &ReadingMessage,
        reading: &EngineReading,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        let (state, mut writes) = self.on_readings(&msg.patient, state, &[(msg, reading)])?;
        Ok((state, writes.pop().unwrap_or_default()))
    }

    /// Evaluates several stored readings of one patient, in order, against the patient's `state`: one
    /// engine, one state serialisation (a gateway catching up after days offline sends a patient's
    /// readings together). Returns the new state and the alert changes per reading.
    ///
    /// # Errors
    /// As [`Self::on_reading`].
    pub fn on_readings(
        &self,
        patient: &str,
        state: Option<&str>,
        readings: &[(&ReadingMessage, &EngineReading)],
    ) -> Result<(NewState, Vec<Vec<AlertWrite>>), EvalError> {
        let inputs: Vec<Input<'_>> = readings
            .iter()
            .map(|(msg, reading)| Input::Reading {
                msg,
                reading,
                symptoms: Symptoms::NONE,
            })
            .collect();
        self.on_inputs(patient, state, &inputs)
    }

    /// Evaluates one patient's stored readings and symptom reports, in arrival order, against the
    /// patient's `state` (one engine, one state serialisation). Returns the new state and the alert
    /// changes per input.
    ///
    /// # Errors
    /// As [`Self::on_reading`].
    pub fn on_inputs(
        &self,
        patient: &str,
        state: Option<&str>,
        inputs: &[Input<'_>],
    ) -> Result<(NewState, Vec<Vec<AlertWrite>>), EvalError> {
        let mut engine = self.engine(patient, state)?;
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
        Ok((self.new_state(engine, patient)?, out))
    }

    /// Time passes for one patient (confirmation timeouts, escalation, window rules, adherence).
    ///
    /// # Errors
    /// As [`Self::on_reading`].
    pub fn on_tick(
        &self,
        patient: &str,
        state: Option<&str>,
        now_utc: i64,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        self.advance(patient, state, now_utc, Engine::on_tick)
    }

    /// A patient's deadlines due at `now_utc` (confirmation timeouts, unacknowledged escalation),
    /// without the window rules.
    ///
    /// # Errors
    /// As [`Self::on_reading`].
    pub fn on_deadlines(
        &self,
        patient: &str,
        state: Option<&str>,
        now_utc: i64,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        self.advance(patient, state, now_utc, Engine::on_deadlines)
    }

    fn advance(
        &self,
        patient: &str,
        state: Option<&str>,
        now_utc: i64,
        step: impl FnOnce(&mut Engine, i64) -> Vec<AlertAction>,
    ) -> Result<(NewState, Vec<AlertWrite>), EvalError> {
        let mut engine = self.engine(patient, state)?;
        let actions: Vec<AlertAction> = step(&mut engine, now_utc)
            .into_iter()
            .filter(|a| a.alert().patient == patient)
            .collect();
        Ok((
            self.new_state(engine, patient)?,
            writes(&actions, self.notify_from)?,
        ))
    }

    /// Marks an alert acknowledged in the patient's state (stops its unacknowledged escalation).
    /// Returns the new state; `false` when the alert is not open in the state.
    ///
    /// # Errors
    /// As [`Self::on_reading`].
    pub fn acknowledge(
        &self,
        patient: &str,
        state: Option<&str>,
        alert_id: &str,
    ) -> Result<(NewState, bool), EvalError> {
        let mut engine = self.engine(patient, state)?;
        let open = engine.acknowledge(patient, alert_id);
        Ok((self.new_state(engine, patient)?, open))
    }
}

/// `{"patients":{"<patient>":`, the start of the engine state's serde form for one patient.
fn state_prefix(patient: &str) -> Result<String, EvalError> {
    let key = serde_json::to_string(patient).map_err(|e| EvalError::State {
        patient: patient.into(),
        source: e,
    })?;
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
    protocol::wire::to_hex(h.finalize().get(..16).unwrap_or_default())
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
    use super::*;
    use crate::store::{Channel, Inbound, Prepared, prepare};
    use crate::testing::{TEST_GATEWAY, bp_message};

    const T0: i64 = 1_795_420_800;

    fn evaluator() -> Evaluator {
        Evaluator::new(RuleSet::default_rules().expect("rules"), vec![Sink::Mqtt])
    }

    /// Evaluates a blood-pressure reading of `patient` at `t` against `state`.
    fn bp(ev: &Evaluator, patient: &str, state: Option<&str>, t: i64, sys: u32) -> NewState {
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
        ev.on_inputs(patient, state, &[input]).expect("evaluated").0
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

    /// The state row is the patient's part of the engine state, written without a `Value` tree and read
    /// back by an instance that never saw the patient: both continue alike.
    #[test]
    fn a_stored_state_is_the_patients_part_and_reads_back() {
        let (a, b) = (evaluator(), evaluator());
        let mut state = bp(&a, "p-0001", None, T0, 185);
        for i in 1..5 {
            state = bp(
                &a,
                "p-0001",
                Some(&state.json),
                T0 + i * 600,
                120 + i as u32,
            );
        }
        let part: Value = serde_json::from_str(&state.json).expect("one JSON value");
        assert!(part.get("bp").is_some_and(Value::is_array), "{part}");
        assert!(!state.json.contains("patients"));
        // `a` continues from its cached engine, `b` parses the row: the same next state.
        let t = T0 + 3_000;
        assert_eq!(
            bp(&a, "p-0001", Some(&state.json), t, 190),
            bp(&b, "p-0001", Some(&state.json), t, 190)
        );
    }

    #[test]
    fn a_state_row_that_is_not_one_value_is_an_error() {
        for bad in ["{} {}", "{\"bp\":[]},{}", "[", "null", "7"] {
            let ev = evaluator();
            assert!(
                matches!(
                    ev.on_tick("p-0001", Some(bad), T0),
                    Err(EvalError::State { .. })
                ),
                "{bad}"
            );
        }
        assert!(evaluator().on_tick("p-0001", Some(" {} "), T0).is_ok());
    }
}
