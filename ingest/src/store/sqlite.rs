//! SQLite, embedded: WAL (readers never block the writer), `synchronous = FULL` (a commit is on disk
//! before the PUBACK that depends on it), a busy timeout so that two instances may share one file (each
//! write transaction is `BEGIN IMMEDIATE`: it takes the single writer lock up front, so evaluations of
//! one patient never interleave).
//!
//! rusqlite is synchronous: each call runs on tokio's blocking pool, holding one of two connections (a
//! writer and a reader, each behind a `std` mutex held only inside the blocking closure).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::batch::{self, BatchTx, Begun, ReadingColumns, ReportRow};
use super::{
    AckResult, AlertRow, BadRow, Counts, Inbound, OutboxItem, Prepared, ReadingRow, ReportAbout,
    Step, Store, StoreError, Stored, digests, prepare, severities_below,
};
use crate::evaluate::{AlertWrite, DigestItem, Evaluator, HistoryRow, NewState, Sink, StoredState};
use protocol::rules::Severity;

/// The SQLite store (cheap to clone: the connections are shared).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

/// How many WAL pages a commit may leave before it copies them into the database file (SQLite's default
/// is 1 000). A batch dirties a page per patient in the readings' index, the states and the kept BP
/// readings, ~1.7 MB of WAL per batch of 64: at the default every second or third commit also ran a
/// checkpoint (writing those pages again, and an fsync of the database file). Ten times fewer
/// checkpoints write each hot page once for many batches: `cargo bench -p ingest --bench ingest` went
/// from 0.16–0.17 to 0.20 of the raw ceiling (docs/performance.md). The price: a WAL file of up to ~40 MB
/// on disk, and one commit in ~20 batches that takes the checkpoint's time (tens of ms).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

fn connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(30))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    // Every statement of the ingest path stays prepared (parsing SQL again per row cost as much as the
    // insert); the default of 16 is fewer than the store's statements.
    c.set_prepared_statement_cache_capacity(64);
    Ok(c)
}

/// The writer connection, with the schema brought to this version.
fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let mut writer = connection(path)?;
    // SQLite has no `ADD COLUMN IF NOT EXISTS`: a database from before the column gets it here,
    // before V1 (which indexes it) adopts the database.
    let (has_table, has_deadline): (bool, bool) = writer.query_row(
        "SELECT count(*) > 0, coalesce(sum(name = 'next_deadline_utc'), 0) > 0
         FROM pragma_table_info('patient_state')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if has_table && !has_deadline {
        writer.execute_batch("ALTER TABLE patient_state ADD COLUMN next_deadline_utc BIGINT")?;
    }
    super::migrations::sqlite::migrations::runner().run(&mut writer)?;
    Ok(writer)
}

impl SqliteStore {
    /// Opens (creating) the database file at `path` and its tables.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] when the file cannot be opened; [`StoreError::Migration`] when the schema
    /// cannot be brought to this version (or the database is from a newer ingest).
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let path = Path::new(path).to_path_buf();
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                // A missing data directory is created; a failure shows up as the open's error.
                let _ = std::fs::create_dir_all(dir);
            }
            // Two openers of a new database at once (two instances, or a tool beside ingest) race: both
            // may read "nothing applied", and the second's history insert then fails on refinery's UNIQUE
            // version; or SQLite answers SQLITE_BUSY at once, without waiting out the busy timeout (the
            // switch to WAL on a new file, or a read that must become a write while the other holds its
            // lock: SQLite's deadlock avoidance). Opening again finds the first opener's work done; a real
            // error (a database from a newer ingest, a damaged file) fails every attempt and is returned.
            // (PostgreSQL takes an advisory lock instead: `postgres.rs`.)
            let mut attempt = 0u64;
            let writer = loop {
                match open_writer(&path) {
                    Ok(w) => break w,
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        tracing::debug!(error = %e, attempt, "opening the database failed; trying again");
                        std::thread::sleep(Duration::from_millis(50 * attempt));
                    }
                    Err(e) => return Err(e),
                }
            };
            let reader = connection(&path)?;
            Ok(SqliteStore {
                writer: Arc::new(Mutex::new(writer)),
                reader: Arc::new(Mutex::new(reader)),
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn with<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `step` for each of `patients` at `now_utc`, one transaction each.
    async fn pass(
        &self,
        mut patients: Vec<String>,
        ev: Arc<Evaluator>,
        now_utc: i64,
        step: Step,
    ) -> Result<usize, StoreError> {
        patients.sort();
        let mut events = 0;
        // One patient per hold of the writer connection: ingestion's batches take turns with the pass
        // instead of waiting for all of it (with thousands of patients, a whole pass takes seconds).
        for p in patients {
            let ev = Arc::clone(&ev);
            events += Self::with(&self.writer, move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let events = run_ready(batch::pass_patient(
                    &mut SqliteBatch { tx: &tx },
                    &p,
                    &ev,
                    now_utc.saturating_mul(1000),
                    |ev, p, engine| step(ev, p, engine, now_utc),
                ))?;
                tx.commit()?;
                Ok(events)
            })
            .await?;
        }
        Ok(events)
    }
}

/// A period's alerts below the push threshold, per patient and rule (`?3`: a JSON array of severities).
const DIGEST_SELECT_SQLITE: &str =
    "SELECT patient, rule_id, severity, count(*), min(opened_utc), max(updated_utc) FROM alerts
     WHERE updated_utc >= ?1 AND updated_utc < ?2 AND severity IN (SELECT value FROM json_each(?3))
     GROUP BY patient, rule_id, severity ORDER BY patient, rule_id, severity";

fn load_state(tx: &rusqlite::Transaction<'_>, patient: &str) -> Result<StoredState, StoreError> {
    Ok(tx
        .prepare_cached("SELECT state, history_rev FROM patient_state WHERE patient = ?1")?
        .query_row([patient], |r| {
            Ok(StoredState {
                json: r.get(0)?,
                history_rev: r.get(1)?,
            })
        })
        .optional()?
        .unwrap_or_default())
}

fn save_state(
    tx: &rusqlite::Transaction<'_>,
    patient: &str,
    state: &NewState,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO patient_state (patient, state, updated_ms, next_deadline_utc, history_rev)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (patient) DO UPDATE SET state = excluded.state, updated_ms = excluded.updated_ms,
           next_deadline_utc = excluded.next_deadline_utc, history_rev = excluded.history_rev",
    )?
    .execute(params![
        patient,
        state.json,
        now_ms,
        state.next_deadline_utc,
        state.history_rev
    ])?;
    let mut delete = tx.prepare_cached(DELETE_HISTORY)?;
    for id in &state.history_removed {
        delete.execute(params![patient, id])?;
    }
    let mut insert = tx.prepare_cached(INSERT_HISTORY)?;
    for r in &state.history_added {
        insert.execute(params![patient, r.reading_id, r.time_utc, r.seq, r.entry])?;
    }
    Ok(())
}

/// An alert event (`?1`…`?5`: id, alert id, action, created, notice). PostgreSQL writes a batch's alert
/// changes in one statement instead (`WRITE_ALERTS` in postgres.rs), which SQLite cannot: its `WITH`
/// takes no `INSERT`.
const INSERT_ALERT_EVENT: &str =
    "INSERT INTO alert_events (id, alert_id, action, created_ms, notice)
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING";
/// An alert's latest state (`?1`…`?8`: id, patient, rule, severity, status, opened, updated, body).
const UPSERT_ALERT: &str =
    "INSERT INTO alerts (id, patient, rule_id, severity, status, opened_utc, updated_utc, body)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
     ON CONFLICT (id) DO UPDATE SET rule_id = excluded.rule_id, severity = excluded.severity,
       status = excluded.status, updated_utc = excluded.updated_utc, body = excluded.body";
/// A kept BP reading (PostgreSQL inserts a batch's in one statement).
const INSERT_HISTORY: &str = "INSERT INTO bp_history (patient, reading_id, time_utc, seq, entry)
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (patient, reading_id) DO NOTHING";
/// A kept BP reading the engine pruned.
const DELETE_HISTORY: &str = "DELETE FROM bp_history WHERE patient = ?1 AND reading_id = ?2";

/// Writes alert changes; an event id already stored (a replay) changes nothing.
fn write_alerts(
    tx: &rusqlite::Transaction<'_>,
    writes: &[AlertWrite],
    sinks: &[Sink],
    now_ms: i64,
) -> Result<(), StoreError> {
    for w in writes {
        let n = tx
            .prepare_cached(INSERT_ALERT_EVENT)?
            .execute(params![w.event_id, w.alert.id, w.action, now_ms, w.notice])?;
        if n == 0 {
            continue;
        }
        tx.prepare_cached(UPSERT_ALERT)?.execute(params![
            w.alert.id,
            w.alert.patient,
            w.alert.rule_id,
            w.alert.severity.name(),
            w.alert.status.name(),
            w.alert.opened_utc,
            w.alert.updated_utc,
            w.alert_json
        ])?;
        // Below the push threshold: stored, and summarised in the patient's digest instead.
        for s in sinks.iter().filter(|_| w.notify) {
            tx.prepare_cached(batch::sql::INSERT_OUTBOX)?
                .execute(params![w.event_id, s.name(), w.notice, now_ms])?;
        }
    }
    Ok(())
}

/// Runs a future that never waits — the shared batch loop over a [`SqliteBatch`], whose statements all
/// run synchronously, on the blocking thread that holds the connection — to its end.
fn run_ready<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(StoreError::Task(
            "a SQLite statement waited (it never should)".into(),
        )),
    }
}

/// One open transaction (under the writer lock: `BEGIN IMMEDIATE`), for the shared batch loop.
struct SqliteBatch<'a, 'c> {
    tx: &'a rusqlite::Transaction<'c>,
}

impl BatchTx for SqliteBatch<'_, '_> {
    async fn begin(
        &mut self,
        patients: &[&str],
        readings: &ReadingColumns<'_>,
        reports: bool,
        now_ms: i64,
        instance: &str,
    ) -> Result<Begun, StoreError> {
        // The writer lock is the lock: `BEGIN IMMEDIATE` took it for the whole database.
        let mut states = HashMap::with_capacity(patients.len());
        for &p in patients {
            states.insert(p.to_owned(), load_state(self.tx, p)?);
        }
        let mut new_ids = HashSet::with_capacity(readings.id.len());
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO readings (id, patient, gateway, kind, time_utc, received_utc, stored_ms,
               instance, payload, eval_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (id) DO NOTHING",
        )?;
        let r = readings;
        for i in 0..r.id.len() {
            let n = insert.execute(params![
                r.id.get(i),
                r.patient.get(i),
                r.gateway.get(i),
                r.kind.get(i),
                r.time_utc.get(i),
                r.received_utc.get(i),
                now_ms,
                instance,
                r.payload.get(i),
                r.eval_error.get(i).and_then(Option::as_deref),
            ])?;
            if let (1.., Some(id)) = (n, r.id.get(i)) {
                new_ids.insert((*id).to_owned());
            }
        }
        let reports = if reports {
            Some(self.reports_about(&r.id).await?)
        } else {
            None
        };
        Ok(Begun {
            states,
            new_ids,
            reports,
        })
    }

    async fn stored_payloads(
        &mut self,
        ids: &[&str],
    ) -> Result<HashMap<String, String>, StoreError> {
        let mut st = self
            .tx
            .prepare_cached("SELECT payload FROM readings WHERE id = ?1")?;
        let mut out = HashMap::with_capacity(ids.len());
        for &id in ids {
            if let Some(payload) = st.query_row([id], |r| r.get(0)).optional()? {
                out.insert(id.to_owned(), payload);
            }
        }
        Ok(out)
    }

    async fn insert_report(
        &mut self,
        report: &ReportRow<'_>,
        now_ms: i64,
        instance: &str,
    ) -> Result<Option<String>, StoreError> {
        let msg = report.msg;
        let n = self
            .tx
            .prepare_cached(batch::sql::INSERT_REPORT)?
            .execute(params![
                msg.id,
                msg.reading_id,
                msg.patient,
                msg.gateway,
                super::symptoms_column(msg.symptom_set()),
                report.answered_utc,
                now_ms,
                instance,
                report.payload,
                report.eval_error,
            ])?;
        if n > 0 {
            return Ok(None);
        }
        Ok(Some(self.tx.query_row(
            batch::sql::STORED_REPORT,
            [&msg.id],
            |r| r.get(0),
        )?))
    }

    async fn insert_once(
        &mut self,
        sql: &'static str,
        [id, a, b]: [&str; 3],
        now_ms: i64,
        payload: &str,
    ) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(sql)?
            .execute(params![id, a, b, now_ms, payload])?;
        Ok(())
    }

    async fn reports_about(
        &mut self,
        reading_ids: &[&str],
    ) -> Result<Vec<ReportAbout>, StoreError> {
        let mut st = self.tx.prepare_cached(
            "SELECT reading_id, id, patient, symptoms FROM symptom_reports
             WHERE reading_id = ?1 AND eval_error IS NULL",
        )?;
        let mut out = Vec::new();
        for &id in reading_ids {
            let rows = st.query_map([id], |r| {
                Ok(ReportAbout {
                    reading_id: r.get(0)?,
                    id: r.get(1)?,
                    patient: r.get(2)?,
                    symptoms: super::symptoms_of_column(&r.get::<_, String>(3)?),
                })
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        Ok(out)
    }

    async fn bp_history(
        &mut self,
        patients: &[&str],
    ) -> Result<HashMap<String, Vec<HistoryRow>>, StoreError> {
        let mut st = self.tx.prepare_cached(
            "SELECT reading_id, time_utc, seq, entry FROM bp_history WHERE patient = ?1",
        )?;
        let mut out = HashMap::with_capacity(patients.len());
        for &p in patients {
            let rows = st.query_map([p], |r| {
                Ok(HistoryRow {
                    reading_id: r.get(0)?,
                    time_utc: r.get(1)?,
                    seq: r.get(2)?,
                    entry: r.get(3)?,
                })
            })?;
            out.insert(p.to_owned(), rows.collect::<Result<Vec<_>, _>>()?);
        }
        Ok(out)
    }

    async fn write(
        &mut self,
        writes: &[AlertWrite],
        sinks: &[Sink],
        states: &[(&str, &NewState)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        write_alerts(self.tx, writes, sinks, now_ms)?;
        for (patient, state) in states {
            save_state(self.tx, patient, state, now_ms)?;
        }
        Ok(())
    }
}

fn reading_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReadingRow> {
    let payload: String = r.get(6)?;
    Ok(ReadingRow {
        id: r.get(0)?,
        patient: r.get(1)?,
        gateway: r.get(2)?,
        kind: r.get(3)?,
        time_utc: r.get(4)?,
        eval_error: r.get(5)?,
        instance: r.get(7)?,
        reading: serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload)),
    })
}

const READING_COLUMNS: &str = "id, patient, gateway, kind, time_utc, eval_error, payload, instance";

impl Store for SqliteStore {
    async fn ingest(
        &self,
        batch: Vec<Inbound>,
        ev: Arc<Evaluator>,
        instance: &str,
        now_ms: i64,
    ) -> Result<Vec<Stored>, StoreError> {
        let instance = instance.to_owned();
        Self::with(&self.writer, move |c| {
            let prepared: Vec<Prepared> = batch.iter().map(prepare).collect();
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = run_ready(batch::ingest(
                &mut SqliteBatch { tx: &tx },
                &batch,
                &prepared,
                &ev,
                &instance,
                now_ms,
            ))?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn tick(&self, ev: Arc<Evaluator>, now_utc: i64) -> Result<usize, StoreError> {
        let patients: Vec<String> = Self::with(&self.writer, |c| {
            let mut st = c.prepare(
                "SELECT patient FROM patient_state UNION SELECT patient FROM patient_settings",
            )?;
            let patients = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(patients)
        })
        .await?;
        self.pass(patients, ev, now_utc, Evaluator::on_tick).await
    }

    async fn deadlines(&self, ev: Arc<Evaluator>, now_utc: i64) -> Result<usize, StoreError> {
        let patients: Vec<String> = Self::with(&self.writer, move |c| {
            let mut st =
                c.prepare("SELECT patient FROM patient_state WHERE next_deadline_utc <= ?1")?;
            let patients = st
                .query_map([now_utc], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(patients)
        })
        .await?;
        self.pass(patients, ev, now_utc, Evaluator::on_deadlines)
            .await
    }

    async fn digest(
        &self,
        from_utc: i64,
        to_utc: i64,
        below: Severity,
        sinks: Vec<Sink>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let severities = serde_json::to_string(&severities_below(below))?;
        Self::with(&self.writer, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rows: Vec<(String, DigestItem)> = {
                let mut st = tx.prepare(DIGEST_SELECT_SQLITE)?;
                st.query_map(params![from_utc, to_utc, severities], |r| {
                    Ok((
                        r.get(0)?,
                        DigestItem {
                            rule_id: r.get(1)?,
                            severity: r.get(2)?,
                            alerts: r.get(3)?,
                            first_utc: r.get(4)?,
                            last_utc: r.get(5)?,
                        },
                    ))
                })?
                .collect::<Result<_, _>>()?
            };
            let mut new = 0;
            for (digest_id, event_id, notice) in digests(rows, from_utc, to_utc)? {
                let n = tx
                    .prepare_cached(
                        "INSERT INTO alert_events (id, alert_id, action, created_ms, notice)
                     VALUES (?1, ?2, 'digest', ?3, ?4) ON CONFLICT (id) DO NOTHING",
                    )?
                    .execute(params![event_id, digest_id, now_ms, notice])?;
                if n == 0 {
                    continue; // another instance, or an earlier pass, wrote it
                }
                new += 1;
                for s in &sinks {
                    tx.prepare_cached(batch::sql::INSERT_OUTBOX)?
                        .execute(params![event_id, s.name(), notice, now_ms])?;
                }
            }
            tx.commit()?;
            Ok(new)
        })
        .await
    }

    async fn next_deadline(&self) -> Result<Option<i64>, StoreError> {
        Self::with(&self.reader, |c| {
            Ok(c.query_row(
                "SELECT min(next_deadline_utc) FROM patient_state",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn claim(
        &self,
        sink: Sink,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let owner = owner.to_owned();
        Self::with(&self.writer, move |c| {
            // One statement under SQLite's writer lock: two claimers can never both take a row.
            let mut st = c.prepare_cached(
                "UPDATE outbox SET lease_owner = ?1, lease_until_ms = ?2
                 WHERE seq IN (SELECT seq FROM outbox
                               WHERE sink = ?3 AND delivered_ms IS NULL AND next_attempt_ms <= ?4
                                 AND lease_until_ms <= ?4
                               ORDER BY seq LIMIT ?5)
                 RETURNING seq, event_id, payload, attempts",
            )?;
            let mut items: Vec<OutboxItem> = st
                .query_map(
                    params![owner, lease_until_ms, sink.name(), now_ms, limit],
                    |r| {
                        Ok(OutboxItem {
                            seq: r.get(0)?,
                            event_id: r.get(1)?,
                            payload: r.get(2)?,
                            attempts: r.get(3)?,
                        })
                    },
                )?
                .collect::<Result<_, _>>()?;
            items.sort_by_key(|i| i.seq);
            Ok(items)
        })
        .await
    }

    async fn delivered(&self, seq: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        let owner = owner.to_owned();
        Self::with(&self.writer, move |c| {
            let n = c.execute(
                "UPDATE outbox SET delivered_ms = ?3, lease_owner = NULL
                 WHERE seq = ?1 AND lease_owner = ?2 AND delivered_ms IS NULL",
                params![seq, owner, now_ms],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn failed(
        &self,
        seq: i64,
        owner: &str,
        next_attempt_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let (owner, error) = (owner.to_owned(), error.to_owned());
        Self::with(&self.writer, move |c| {
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?3, lease_owner = NULL,
                   lease_until_ms = 0, last_error = ?4
                 WHERE seq = ?1 AND lease_owner = ?2 AND delivered_ms IS NULL",
                params![seq, owner, next_attempt_ms, error],
            )?;
            Ok(())
        })
        .await
    }

    async fn put_patient(
        &self,
        patient: &str,
        settings_json: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (patient, settings) = (patient.to_owned(), settings_json.to_owned());
        Self::with(&self.writer, move |c| {
            c.execute(
                "INSERT INTO patient_settings (patient, settings, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (patient) DO UPDATE SET settings = excluded.settings,
                   updated_ms = excluded.updated_ms",
                params![patient, settings, now_ms],
            )?;
            Ok(())
        })
        .await
    }

    async fn patients(&self) -> Result<Vec<String>, StoreError> {
        Self::with(&self.reader, |c| {
            let mut st = c.prepare("SELECT settings FROM patient_settings ORDER BY patient")?;
            Ok(st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn readings_of(&self, patient: &str, limit: i64) -> Result<Vec<ReadingRow>, StoreError> {
        let patient = patient.to_owned();
        Self::with(&self.reader, move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {READING_COLUMNS} FROM readings WHERE patient = ?1
                 ORDER BY time_utc DESC, id LIMIT ?2"
            ))?;
            Ok(st
                .query_map(params![patient, limit], reading_row)?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn reading(&self, id: &str) -> Result<Option<ReadingRow>, StoreError> {
        let id = id.to_owned();
        Self::with(&self.reader, move |c| {
            Ok(c.query_row(
                &format!("SELECT {READING_COLUMNS} FROM readings WHERE id = ?1"),
                [id],
                reading_row,
            )
            .optional()?)
        })
        .await
    }

    async fn alerts_of(&self, patient: &str, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        let patient = patient.to_owned();
        Self::with(&self.reader, move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, patient, rule_id, severity, status, acknowledged_by, acknowledged_ms, body
                 FROM alerts WHERE patient = ?1 ORDER BY opened_utc DESC, id LIMIT ?2",
            )?;
            Ok(st
                .query_map(params![patient, limit], |r| {
                    let body: String = r.get(7)?;
                    Ok(AlertRow {
                        id: r.get(0)?,
                        patient: r.get(1)?,
                        rule_id: r.get(2)?,
                        severity: r.get(3)?,
                        status: r.get(4)?,
                        acknowledged_by: r.get(5)?,
                        acknowledged_ms: r.get(6)?,
                        alert: serde_json::from_str(&body)
                            .unwrap_or(serde_json::Value::String(body)),
                    })
                })?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        ev: Arc<Evaluator>,
        now_ms: i64,
    ) -> Result<AckResult, StoreError> {
        let (alert_id, by) = (alert_id.to_owned(), by.to_owned());
        Self::with(&self.writer, move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT patient, acknowledged_by FROM alerts WHERE id = ?1",
                    [&alert_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((patient, ack_by)) = row else {
                return Ok(AckResult::NotFound);
            };
            if ack_by.is_some() {
                return Ok(AckResult::Already);
            }
            tx.prepare_cached(
                "UPDATE alerts SET acknowledged_by = ?2, acknowledged_ms = ?3 WHERE id = ?1",
            )?
            .execute(params![alert_id, by, now_ms])?;
            run_ready(batch::pass_patient(
                &mut SqliteBatch { tx: &tx },
                &patient,
                &ev,
                now_ms,
                |ev, p, engine| Ok((ev.acknowledge(p, engine, &alert_id)?.0, Vec::new())),
            ))?;
            tx.commit()?;
            Ok(AckResult::Acknowledged)
        })
        .await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Self::with(&self.reader, |c| {
            let n =
                |sql: &str| -> Result<i64, rusqlite::Error> { c.query_row(sql, [], |r| r.get(0)) };
            Ok(Counts {
                readings: n("SELECT count(*) FROM readings")?,
                alerts: n("SELECT count(*) FROM alerts")?,
                alert_events: n("SELECT count(*) FROM alert_events")?,
                outbox_pending: n("SELECT count(*) FROM outbox WHERE delivered_ms IS NULL")?,
                outbox_delivered: n("SELECT count(*) FROM outbox WHERE delivered_ms IS NOT NULL")?,
                bad_messages: n("SELECT count(*) FROM bad_messages")?,
                symptom_reports: n("SELECT count(*) FROM symptom_reports")?,
                notified_events: n("SELECT count(DISTINCT event_id) FROM outbox")?,
            })
        })
        .await
    }

    async fn bad_messages(&self, limit: i64) -> Result<Vec<BadRow>, StoreError> {
        Self::with(&self.reader, move |c| {
            let mut st = c.prepare(
                "SELECT topic, error, received_ms FROM bad_messages
                 ORDER BY received_ms DESC, id LIMIT ?1",
            )?;
            let rows = st.query_map([limit], |r| {
                Ok(BadRow {
                    topic: r.get(0)?,
                    error: r.get(1)?,
                    received_ms: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::SqliteStore;

    /// Two processes opening one new database at once (an instance starting while a tool or a test opens
    /// the file): both must get a migrated store, neither a "table already exists" failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_opens_of_a_new_database_at_once_both_succeed() {
        for round in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("ingest.sqlite");
            let path = path.to_str().expect("utf-8");
            let (a, b) = tokio::join!(SqliteStore::open(path), SqliteStore::open(path));
            assert!(
                a.is_ok() && b.is_ok(),
                "round {round}: {:?} / {:?}",
                a.err(),
                b.err()
            );
        }
    }
}
