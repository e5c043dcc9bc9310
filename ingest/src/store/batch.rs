//! The one batch loop both stores run (issue 15 item 5): what a batch of messages stores, evaluates and
//! writes, in which order, under which locks. The SQL dialect is the only difference: each store gives
//! the loop a [`BatchTx`] — the statements of one open transaction — and commits it when the loop returns
//! `Ok`. PostgreSQL sends a step's statements together (one round trip); SQLite runs them one after the
//! other under its single writer lock.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use protocol::wire::SymptomsMessage;

use super::{Inbound, Item, Prepared, ReportAbout, StoreError, Stored};
use crate::evaluate::{
    AlertWrite, EvalError, Evaluator, HistoryRow, NewState, PatientEngine, Sink, StoredState,
    Unreadable,
};

/// Statements both dialects run as they are: `$1` … is PostgreSQL's placeholder and one of SQLite's
/// (a named parameter; numbered by first appearance, which is their order here).
pub(crate) mod sql {
    /// A symptom report (`$1`…`$10`: id, reading id, patient, gateway, symptoms, answered, stored,
    /// instance, payload, eval error).
    pub const INSERT_REPORT: &str = "INSERT INTO symptom_reports (id, reading_id, patient, gateway,
         symptoms, answered_utc, stored_ms, instance, payload, eval_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING";
    /// The payload stored under a symptom report's id.
    pub const STORED_REPORT: &str = "SELECT payload FROM symptom_reports WHERE id = $1";
    /// A gateway event (`$1`…`$5`: id, gateway, kind, received, payload).
    pub const INSERT_GATEWAY_EVENT: &str =
        "INSERT INTO gateway_events (id, gateway, kind, received_ms, payload)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING";
    /// A bad message (`$1`…`$5`: id, topic, error, received, payload).
    pub const INSERT_BAD: &str = "INSERT INTO bad_messages (id, topic, error, received_ms, payload)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING";
    /// An outbox row (`$1`…`$4`: event id, sink, payload, next attempt).
    pub const INSERT_OUTBOX: &str =
        "INSERT INTO outbox (event_id, sink, payload, next_attempt_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (event_id, sink) DO NOTHING";
}

/// A batch's readings, column by column (PostgreSQL inserts them with one `unnest`).
#[derive(Debug, Default)]
pub(crate) struct ReadingColumns<'a> {
    pub id: Vec<&'a str>,
    pub patient: Vec<&'a str>,
    pub gateway: Vec<&'a str>,
    pub kind: Vec<&'a str>,
    pub time_utc: Vec<i64>,
    pub received_utc: Vec<i64>,
    pub payload: Vec<&'a str>,
    pub eval_error: Vec<Option<String>>,
}

/// What [`BatchTx::begin`] found and did.
#[derive(Debug, Default)]
pub(crate) struct Begun {
    /// Each locked patient's stored engine state.
    pub states: HashMap<String, StoredState>,
    /// The reading ids this batch stored (not stored before).
    pub new_ids: HashSet<String>,
    /// The evaluable symptom reports about the batch's readings, when asked for.
    pub reports: Option<Vec<ReportAbout>>,
}

/// A symptom report to store (`symptom_reports`).
#[derive(Debug)]
pub(crate) struct ReportRow<'a> {
    pub msg: &'a SymptomsMessage,
    pub payload: &'a str,
    pub answered_utc: i64,
    /// Why it is not evaluated, if it is not.
    pub eval_error: Option<&'a str>,
}

/// The statements of one open transaction, in a store's SQL dialect. Every insert is idempotent by id
/// (`ON CONFLICT DO NOTHING`): a redelivered message stores nothing twice.
pub(crate) trait BatchTx {
    /// Locks the engine states of `patients` (sorted, distinct; creating the missing rows), in that
    /// order — two instances never deadlock and never evaluate one patient at once — and stores
    /// `readings`; with `reports`, also reads the evaluable symptom reports about them, after storing.
    async fn begin(
        &mut self,
        patients: &[&str],
        readings: &ReadingColumns<'_>,
        reports: bool,
        now_ms: i64,
        instance: &str,
    ) -> Result<Begun, StoreError>;

    /// The payloads stored under reading ids (to tell a duplicate from a conflict).
    async fn stored_payloads(
        &mut self,
        ids: &[&str],
    ) -> Result<HashMap<String, String>, StoreError>;

    /// Stores a symptom report; `Some(the payload stored)` when its id was stored before.
    async fn insert_report(
        &mut self,
        report: &ReportRow<'_>,
        now_ms: i64,
        instance: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Stores a row once per id with one of the five-column statements [`sql::INSERT_GATEWAY_EVENT`]
    /// (id, gateway, kind) and [`sql::INSERT_BAD`] (id, topic, error), then the received time and the
    /// payload.
    async fn insert_once(
        &mut self,
        sql: &'static str,
        keys: [&str; 3],
        now_ms: i64,
        payload: &str,
    ) -> Result<(), StoreError>;

    /// The kept BP readings stored for `patients` (`bp_history`), by patient.
    async fn bp_history(
        &mut self,
        patients: &[&str],
    ) -> Result<HashMap<String, Vec<HistoryRow>>, StoreError>;

    /// The evaluable symptom reports about `reading_ids`.
    async fn reports_about(&mut self, reading_ids: &[&str])
    -> Result<Vec<ReportAbout>, StoreError>;

    /// Writes alert changes (events, alerts, outbox rows for the pushed ones; a replayed event id
    /// changes nothing) and the patients' new engine states (the state row and the history rows
    /// added and removed), in that order.
    async fn write(
        &mut self,
        writes: &[AlertWrite],
        sinks: &[Sink],
        states: &[(&str, &NewState)],
        now_ms: i64,
    ) -> Result<(), StoreError>;
}

/// Records a [`Prepared::Bad`].
async fn store_bad<T: BatchTx>(
    tx: &mut T,
    p: &Prepared,
    now_ms: i64,
) -> Result<Stored, StoreError> {
    let Prepared::Bad {
        id,
        topic,
        error,
        payload,
    } = p
    else {
        return Err(StoreError::Task("not a bad message".into()));
    };
    tx.insert_once(sql::INSERT_BAD, [id, topic, error], now_ms, payload)
        .await?;
    Ok(Stored::Bad(error.clone()))
}

/// An id stored before: a duplicate, or — `conflict`, the record of another content under that id — a
/// conflict kept in `bad_messages`.
async fn duplicate_or_conflict<T: BatchTx>(
    tx: &mut T,
    conflict: Option<Prepared>,
    now_ms: i64,
) -> Result<Stored, StoreError> {
    match conflict {
        Some(record) => store_bad(tx, &record, now_ms).await,
        None => Ok(Stored::Duplicate),
    }
}

/// Stores and evaluates one batch in `tx` (the caller commits on `Ok`): the readings, the symptom
/// reports, the events, the bad messages; then each patient's new readings and reports through one
/// engine, against the state locked at the start; then the alerts and the new states. One [`Stored`]
/// per message, in order.
pub(crate) async fn ingest<T: BatchTx>(
    tx: &mut T,
    batch: &[Inbound],
    prepared: &[Prepared],
    ev: &Evaluator,
    instance: &str,
    now_ms: i64,
) -> Result<Vec<Stored>, StoreError> {
    let patients: Vec<&str> = prepared
        .iter()
        .filter_map(|p| match p {
            Prepared::Reading { msg, .. } => Some(msg.patient.as_str()),
            Prepared::Symptoms { msg, .. } => Some(msg.patient.as_str()),
            _ => None,
        })
        .collect::<BTreeSet<&str>>()
        .into_iter()
        .collect();
    let mut cols = ReadingColumns::default();
    for p in prepared {
        if let Prepared::Reading {
            msg,
            payload,
            time_utc,
            received_utc,
            engine,
        } = p
        {
            cols.id.push(&msg.id);
            cols.patient.push(&msg.patient);
            cols.gateway.push(&msg.gateway);
            cols.kind.push(super::kind_name(msg));
            cols.time_utc.push(*time_utc);
            cols.received_utc.push(*received_utc);
            cols.payload.push(payload);
            cols.eval_error
                .push(engine.as_ref().err().map(ToString::to_string));
        }
    }
    // A batch without symptom reports (nearly all) reads the reports about its readings at once; one
    // with reports reads them after storing its own (below), which the readings may need.
    let has_reports = prepared
        .iter()
        .any(|p| matches!(p, Prepared::Symptoms { .. }));
    let Begun {
        mut states,
        mut new_ids,
        reports: early_reports,
    } = tx
        .begin(
            &patients,
            &cols,
            !has_reports && !cols.id.is_empty(),
            now_ms,
            instance,
        )
        .await?;
    // What is stored under the ids that were not new or come twice in this batch: a duplicate, or a
    // conflict when the content differs.
    let mut seen: HashSet<&str> = HashSet::new();
    let old_ids: Vec<&str> = cols
        .id
        .iter()
        .copied()
        .filter(|id| !seen.insert(id) || !new_ids.contains(*id))
        .collect();
    let stored_payloads = if old_ids.is_empty() {
        HashMap::new()
    } else {
        tx.stored_payloads(&old_ids).await?
    };
    let mut out: Vec<Stored> = Vec::with_capacity(prepared.len());
    // New, evaluable readings and symptom reports by patient, in arrival order (with the position in
    // the batch).
    let mut by_patient: BTreeMap<&str, Vec<(usize, Item<'_>)>> = BTreeMap::new();
    for (i, (p, m)) in prepared.iter().zip(batch).enumerate() {
        match p {
            Prepared::Reading {
                msg,
                engine,
                payload,
                ..
            } => {
                // `remove`: a second copy of the same id in this batch is a duplicate.
                if !new_ids.remove(&msg.id) {
                    let stored = stored_payloads.get(&msg.id).map_or("", String::as_str);
                    let conflict = super::conflicts(stored, msg)
                        .then(|| super::conflict_record(&m.topic, payload));
                    out.push(duplicate_or_conflict(tx, conflict, now_ms).await?);
                    continue;
                }
                match engine {
                    Ok(reading) => {
                        out.push(Stored::New { alerts: 0 });
                        by_patient
                            .entry(msg.patient.as_str())
                            .or_default()
                            .push((i, Item::Reading(msg, reading)));
                    }
                    Err(e) => out.push(Stored::Rejected(e.to_string())),
                }
            }
            Prepared::Symptoms {
                msg,
                payload,
                answered_utc,
                symptoms,
            } => {
                // Reports are rare (a kiosk answer): one statement each.
                let row = ReportRow {
                    msg,
                    payload,
                    answered_utc: *answered_utc,
                    eval_error: symptoms.as_ref().err().map(String::as_str),
                };
                if let Some(stored) = tx.insert_report(&row, now_ms, instance).await? {
                    let conflict = super::report_conflicts(&stored, msg)
                        .then(|| super::report_conflict_record(&m.topic, payload));
                    out.push(duplicate_or_conflict(tx, conflict, now_ms).await?);
                    continue;
                }
                match symptoms {
                    Ok(symptoms) => {
                        out.push(Stored::New { alerts: 0 });
                        by_patient.entry(msg.patient.as_str()).or_default().push((
                            i,
                            Item::Symptoms {
                                id: &msg.id,
                                answered_utc: *answered_utc,
                                symptoms: *symptoms,
                            },
                        ));
                    }
                    Err(e) => out.push(Stored::Rejected(e.clone())),
                }
            }
            Prepared::Event {
                id,
                gateway,
                kind,
                payload,
            } => {
                tx.insert_once(
                    sql::INSERT_GATEWAY_EVENT,
                    [id, gateway, kind],
                    now_ms,
                    payload,
                )
                .await?;
                out.push(Stored::Event);
            }
            Prepared::Bad { .. } => out.push(store_bad(tx, p, now_ms).await?),
        }
    }
    // The reports stored about this batch's new readings (the patients are locked, so a report
    // committed by another instance is either seen here or sees these readings).
    let rows = match early_reports {
        Some(rows) => rows,
        None => {
            let reading_ids: Vec<&str> = by_patient
                .values()
                .flatten()
                .filter_map(|(_, item)| match item {
                    Item::Reading(msg, _) => Some(msg.id.as_str()),
                    Item::Symptoms { .. } => None,
                })
                .collect();
            if reading_ids.is_empty() {
                Vec::new()
            } else {
                tx.reports_about(&reading_ids).await?
            }
        }
    };
    let mut reports: HashMap<String, Vec<ReportAbout>> = HashMap::new();
    for report in rows {
        reports
            .entry(report.patient.clone())
            .or_default()
            .push(report);
    }
    // Each patient's new readings and reports through one engine; a reading with the reports about it
    // stored before it.
    let mut changed: BTreeMap<String, NewState> = BTreeMap::new();
    let mut pending: Vec<AlertWrite> = Vec::new();
    let patients: Vec<&str> = by_patient.keys().copied().collect();
    let mut engines = engines(tx, ev, &patients, &mut states, now_ms).await?;
    for (patient, items) in by_patient {
        let Some(engine) = engines.remove(patient) else {
            return Err(StoreError::Task("a patient's engine was not built".into()));
        };
        let about = reports.remove(patient).unwrap_or_default();
        let inputs = super::inputs(&items, &about);
        let (new_state, writes) = ev.on_inputs(patient, engine, &inputs)?;
        changed.insert(patient.to_owned(), new_state);
        for ((i, _), w) in items.iter().zip(writes) {
            if let Some(slot) = out.get_mut(*i) {
                *slot = Stored::New { alerts: w.len() };
            }
            pending.extend(w);
        }
    }
    let saves: Vec<(&str, &NewState)> = changed.iter().map(|(p, s)| (p.as_str(), s)).collect();
    tx.write(&pending, ev.sinks(), &saves, now_ms).await?;
    Ok(out)
}

/// The engines of `patients` with their `states` (taken out of the map): the cached ones where the
/// stored state is what this instance left, the others rebuilt from the state and the history rows,
/// read in one statement.
async fn engines<T: BatchTx>(
    tx: &mut T,
    ev: &Evaluator,
    patients: &[&str],
    states: &mut HashMap<String, StoredState>,
    now_ms: i64,
) -> Result<HashMap<String, PatientEngine>, StoreError> {
    let mut out = HashMap::with_capacity(patients.len());
    let mut missing = Vec::new();
    for &p in patients {
        let stored = states.remove(p).unwrap_or_default();
        match ev.cached(p, &stored) {
            Some(engine) => {
                out.insert(p.to_owned(), engine);
            }
            None => missing.push((p, stored)),
        }
    }
    // A row from before V3 (no revision) has no history rows to read.
    let read: Vec<&str> = missing
        .iter()
        .filter(|(_, s)| s.history_rev.is_some())
        .map(|(p, _)| *p)
        .collect();
    let mut rows = if read.is_empty() {
        HashMap::new()
    } else {
        tx.bp_history(&read).await?
    };
    for (p, stored) in missing {
        let history = rows.remove(p).unwrap_or_default();
        let (engine, unreadable) = ev.rebuild(p, &stored, history)?;
        for u in unreadable {
            set_aside(tx, p, &u, now_ms).await?;
        }
        out.insert(p.to_owned(), engine);
    }
    Ok(out)
}

/// Keeps a stored row the engine could not read in `bad_messages` (its table as the topic; the id from
/// its content, so a retried batch keeps it once) and says so at ERROR — without the patient or a
/// value: the operator finds both in the database.
async fn set_aside<T: BatchTx>(
    tx: &mut T,
    patient: &str,
    u: &Unreadable,
    now_ms: i64,
) -> Result<(), StoreError> {
    let what = super::json_error(&u.error);
    tracing::error!(
        table = u.table,
        error = %what,
        "a patient's stored alert state is unreadable: evaluating without it (a fresh state, or the \
         history without that reading) and keeping it in bad_messages"
    );
    let id = format!(
        "unreadable/{}",
        super::digest_hex(&[u.table.as_bytes(), patient.as_bytes(), u.text.as_bytes()])
    );
    let error = format!(
        "unreadable {} row of patient {patient}, left out of the evaluation: {what}",
        u.table
    );
    tx.insert_once(sql::INSERT_BAD, [&id, u.table, &error], now_ms, &u.text)
        .await
}

/// One patient's turn of a pass (a tick, the deadlines, an acknowledgement) in `tx` (the caller
/// commits on `Ok`): the state locked, `step` run on the patient's engine, the alerts and the new
/// state written. Returns the alert events.
pub(crate) async fn pass_patient<T: BatchTx>(
    tx: &mut T,
    patient: &str,
    ev: &Evaluator,
    now_ms: i64,
    step: impl FnOnce(&Evaluator, &str, PatientEngine) -> Result<(NewState, Vec<AlertWrite>), EvalError>,
) -> Result<usize, StoreError> {
    let mut begun = tx
        .begin(&[patient], &ReadingColumns::default(), false, now_ms, "")
        .await?;
    let mut engines = engines(tx, ev, &[patient], &mut begun.states, now_ms).await?;
    let Some(engine) = engines.remove(patient) else {
        return Err(StoreError::Task("a patient's engine was not built".into()));
    };
    let (new_state, writes) = step(ev, patient, engine)?;
    tx.write(&writes, ev.sinks(), &[(patient, &new_state)], now_ms)
        .await?;
    Ok(writes.len())
}
