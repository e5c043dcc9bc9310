//! PostgreSQL, by URL (tokio-postgres, no TLS: run it on a private network or behind a TLS-terminating
//! proxy; TLS is a follow-up).
//!
//! A batch's readings go in with one multi-row `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING
//! RETURNING id` (one round trip); the batch's patients are locked up front, in sorted order
//! (`SELECT … ORDER BY patient FOR UPDATE`), so two instances never deadlock and never evaluate one patient
//! at once. Outbox rows are claimed with `FOR UPDATE SKIP LOCKED`.
//!
//! Two connections per store: a writer (transactions, behind an async mutex) and a reader (the API).
//! A lost connection is re-opened at the next call.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A statement parameter.
type P<'a> = dyn ToSql + Sync + 'a;

use super::batch::{self, BatchTx, Begun, ReadingColumns, ReportRow};
use super::{
    AckResult, AlertRow, BadRow, Counts, Inbound, OutboxItem, Prepared, ReadingRow, ReportAbout,
    Step, Store, StoreError, Stored, digests, prepare, severities_below,
};
use crate::evaluate::{AlertWrite, DigestItem, Evaluator, HistoryRow, NewState, Sink, StoredState};
use protocol::rules::Severity;

/// The PostgreSQL store (cheap to clone).
#[derive(Clone)]
pub struct PgStore {
    url: Arc<str>,
    /// TLS to the server (rustls, verifying its certificate); `None`: plaintext.
    tls: Option<MakeRustlsConnect>,
    writer: Arc<Mutex<Conn>>,
    reader: Arc<Mutex<Conn>>,
}

/// A connection and, once used for writing, its prepared statements (a statement belongs to the
/// connection that prepared it: a re-opened connection prepares them again).
struct Conn {
    client: Client,
    statements: Option<Statements>,
}

impl Conn {
    fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: None,
        }
    }

    /// The write path's statements, prepared at the first call (one round trip for all of them).
    async fn statements(&mut self) -> Result<Statements, StoreError> {
        if let Some(s) = &self.statements {
            return Ok(s.clone());
        }
        let c = &self.client;
        let (seed_states, lock_states, insert_readings, reports) = futures_util::future::try_join4(
            c.prepare(SEED_STATES),
            c.prepare(LOCK_STATES),
            c.prepare(INSERT_READINGS),
            c.prepare(REPORTS_ABOUT),
        )
        .await?;
        let (write_alerts, save_states, insert_history, delete_history, history) =
            futures_util::future::try_join5(
                c.prepare(WRITE_ALERTS),
                c.prepare(SAVE_STATES),
                c.prepare(INSERT_HISTORY),
                c.prepare(DELETE_HISTORY),
                c.prepare(HISTORY),
            )
            .await?;
        let s = Statements {
            seed_states,
            lock_states,
            insert_readings,
            reports,
            write_alerts,
            save_states,
            insert_history,
            delete_history,
            history,
        };
        self.statements = Some(s.clone());
        Ok(s)
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The statements of the ingest path, prepared once per connection: preparing is a round trip of its
/// own, and a batch's statements are otherwise sent together ([`write_all`], `PgBatch::begin`), which
/// only works for prepared ones (a statement given as text is prepared first, out of turn).
#[derive(Clone)]
struct Statements {
    seed_states: Statement,
    lock_states: Statement,
    insert_readings: Statement,
    reports: Statement,
    write_alerts: Statement,
    save_states: Statement,
    insert_history: Statement,
    delete_history: Statement,
    history: Statement,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("PgStore")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// TLS to PostgreSQL trusting the CA certificates in `ca_pem` (PEM), with `sslmode=require` semantics:
/// the connection is encrypted and the server's certificate must verify against them for the URL's host.
///
/// # Errors
/// [`StoreError::Tls`] when the PEM holds no usable certificate.
pub fn postgres_tls(ca_pem: &[u8]) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| StoreError::Tls(format!("CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Tls(format!("CA file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Tls("CA file: no certificate in it".into()));
    }
    // The provider named, not left to rustls to guess: this build has both of rustls' providers.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

async fn client(url: &str, tls: Option<&MakeRustlsConnect>) -> Result<Client, StoreError> {
    let client = match tls {
        Some(tls) => {
            // sslmode=require: with a connector, tokio-postgres's default ("prefer") would fall back to
            // plaintext if the server declined.
            let mut config: tokio_postgres::Config = url.parse()?;
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, conn) = config.connect(tls.clone()).await?;
            spawn_connection(conn);
            client
        }
        None => {
            let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
            spawn_connection(conn);
            client
        }
    };
    Ok(client)
}

fn spawn_connection<F>(conn: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
}

impl PgStore {
    /// Connects to `url` and creates the tables (under an advisory lock: instances may start together).
    ///
    /// # Errors
    /// [`StoreError::Postgres`] when the server cannot be reached; [`StoreError::Migration`] when the
    /// schema cannot be brought to this version (or the database is from a newer ingest).
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        PgStore::connect_with(url, None).await
    }

    /// [`PgStore::connect`], over TLS when `tls` is given ([`postgres_tls`]).
    ///
    /// # Errors
    /// As [`PgStore::connect`]; a server without TLS, or whose certificate does not verify, is an error.
    pub async fn connect_with(
        url: &str,
        tls: Option<MakeRustlsConnect>,
    ) -> Result<PgStore, StoreError> {
        let mut writer = client(url, tls.as_ref()).await?;
        writer
            .execute("SELECT pg_advisory_lock(728374)", &[])
            .await?;
        let migrated = super::migrations::postgres::migrations::runner()
            .run_async(&mut writer)
            .await;
        writer
            .execute("SELECT pg_advisory_unlock(728374)", &[])
            .await?;
        migrated?;
        let reader = client(url, tls.as_ref()).await?;
        Ok(PgStore {
            url: url.into(),
            tls,
            writer: Arc::new(Mutex::new(Conn::new(writer))),
            reader: Arc::new(Mutex::new(Conn::new(reader))),
        })
    }

    /// Runs `step` at `now_utc` for each patient `select` (with `params`) lists, one transaction each.
    async fn pass(
        &self,
        select: &str,
        params: &[&P<'_>],
        ev: Arc<Evaluator>,
        now_utc: i64,
        step: Step,
    ) -> Result<usize, StoreError> {
        let mut client = self.get(&self.writer).await?;
        let st = client.statements().await?;
        let rows = client.query(select, params).await?;
        let patients: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
        let mut events = 0;
        for p in patients {
            let tx = client.transaction().await?;
            events += batch::pass_patient(
                &mut PgBatch { tx: &tx, st: &st },
                &p,
                &ev,
                now_utc.saturating_mul(1000),
                |ev, p, engine| step(ev, p, engine, now_utc),
            )
            .await?;
            tx.commit().await?;
        }
        Ok(events)
    }

    /// The client behind `m`, re-connected when its connection was lost.
    async fn get<'a>(
        &self,
        m: &'a Mutex<Conn>,
    ) -> Result<tokio::sync::MutexGuard<'a, Conn>, StoreError> {
        let mut g = m.lock().await;
        if g.is_closed() {
            *g = Conn::new(client(&self.url, self.tls.as_ref()).await?);
        }
        Ok(g)
    }
}

/// Creates the missing state rows of `patients` (sorted) and locks them all, in that order: two
/// instances never deadlock and never evaluate one patient at once. Both statements go out together.
async fn lock_states(
    tx: &Transaction<'_>,
    st: &Statements,
    patients: &[&str],
    now_ms: i64,
) -> Result<HashMap<String, StoredState>, StoreError> {
    let (_, rows) = futures_util::future::try_join(
        tx.execute(&st.seed_states, &[&patients, &now_ms]),
        tx.query(&st.lock_states, &[&patients]),
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let json: String = r.get(1);
            let stored = StoredState {
                json: Some(json).filter(|s| !s.is_empty()),
                history_rev: r.get(2),
            };
            (r.get(0), stored)
        })
        .collect())
}

const SEED_STATES: &str = "INSERT INTO patient_state (patient, state, updated_ms)
     SELECT p, '', $2 FROM unnest($1::text[]) AS p ORDER BY p ON CONFLICT (patient) DO NOTHING";
const LOCK_STATES: &str =
    "SELECT patient, state, history_rev FROM patient_state WHERE patient = ANY($1)
     ORDER BY patient FOR UPDATE";
/// All of a batch's readings in one statement; the ids it returns are the new ones.
const INSERT_READINGS: &str =
    "INSERT INTO readings (id, patient, gateway, kind, time_utc, received_utc, payload, eval_error,
       stored_ms, instance)
     SELECT id, patient, gateway, kind, time_utc, received_utc, payload, eval_error, $9, $10
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                 $7::text[], $8::text[])
       AS t(id, patient, gateway, kind, time_utc, received_utc, payload, eval_error)
     ON CONFLICT (id) DO NOTHING RETURNING id";
/// The evaluable reports stored about the readings `$1`.
const REPORTS_ABOUT: &str = "SELECT reading_id, id, patient, symptoms FROM symptom_reports
     WHERE reading_id = ANY($1::text[]) AND eval_error IS NULL";
/// A batch's alert changes in one statement (`$1`…`$12`, one element per change in order: event id,
/// alert id, action, notice, patient, rule, severity, status, opened, updated, body, pushed; `$13` now,
/// `$14` the sinks): the events, then — only for the events that are new, so a replayed one changes
/// nothing, as on SQLite — each alert's row from its last new change, and an outbox row per sink for the
/// pushed ones, in the changes' order. One statement instead of one per change: the server's cost per
/// statement was most of a batch's write time.
const WRITE_ALERTS: &str = "WITH w AS (
       SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                            $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::bool[])
         WITH ORDINALITY AS w(event_id, alert_id, action, notice, patient, rule_id, severity, status,
                              opened_utc, updated_utc, body, pushed, ord)
     ), event AS (
       INSERT INTO alert_events (id, alert_id, action, created_ms, notice)
       SELECT event_id, alert_id, action, $13, notice FROM w ORDER BY ord
       ON CONFLICT (id) DO NOTHING RETURNING id
     ), new AS (
       SELECT w.* FROM w WHERE w.event_id IN (SELECT id FROM event)
     ), alert AS (
       INSERT INTO alerts (id, patient, rule_id, severity, status, opened_utc, updated_utc, body)
       SELECT DISTINCT ON (alert_id) alert_id, patient, rule_id, severity, status, opened_utc,
         updated_utc, body
       FROM new ORDER BY alert_id, ord DESC
       ON CONFLICT (id) DO UPDATE SET rule_id = excluded.rule_id, severity = excluded.severity,
         status = excluded.status, updated_utc = excluded.updated_utc, body = excluded.body
     )
     INSERT INTO outbox (event_id, sink, payload, next_attempt_ms)
     SELECT new.event_id, sink, new.notice, $13 FROM new CROSS JOIN unnest($14::text[]) AS sink
     WHERE new.pushed ORDER BY new.ord, sink
     ON CONFLICT (event_id, sink) DO NOTHING";
/// A batch's new engine states, all patients in one statement (`$1`…`$4`: patients, states, next
/// deadlines, history revisions; `$5`: now). One statement instead of one per patient: the server's
/// cost per statement (executor start, snapshot, lock) was most of a batch's time with 64 patients.
/// The rows exist and are locked: `begin` seeded and locked them.
const SAVE_STATES: &str = "UPDATE patient_state s
     SET state = n.state, updated_ms = $5, next_deadline_utc = n.deadline, history_rev = n.rev
     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS n(patient, state, deadline, rev)
     WHERE s.patient = n.patient";
/// A batch's kept BP readings, all patients in one statement (columns as [`batch::sql::INSERT_HISTORY`]).
const INSERT_HISTORY: &str = "INSERT INTO bp_history (patient, reading_id, time_utc, seq, entry)
     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[])
     ON CONFLICT (patient, reading_id) DO NOTHING";
/// The kept BP readings a batch's engines pruned, in one statement (`$1`, `$2`: patients, reading ids).
const DELETE_HISTORY: &str = "DELETE FROM bp_history h
     USING unnest($1::text[], $2::text[]) AS d(patient, reading_id)
     WHERE h.patient = d.patient AND h.reading_id = d.reading_id";
/// The kept BP readings of the patients `$1`.
const HISTORY: &str =
    "SELECT patient, reading_id, time_utc, seq, entry FROM bp_history WHERE patient = ANY($1)";

/// Writes alert changes and patient states, pipelined: every statement is sent before the first answer
/// is awaited (tokio-postgres sends in polling order, and the server runs them in that order). The alert
/// changes are one statement, applied in their order; a replayed event id changes nothing
/// (`ON CONFLICT`).
async fn write_all(
    tx: &Transaction<'_>,
    st: &Statements,
    writes: &[AlertWrite],
    sinks: &[Sink],
    states: &[(&str, &NewState)],
    now_ms: i64,
) -> Result<(), StoreError> {
    if writes.is_empty() && states.is_empty() {
        return Ok(());
    }
    // The alert changes, column by column (one `unnest`).
    let mut a = AlertColumns::default();
    for w in writes {
        a.event_id.push(&w.event_id);
        a.alert_id.push(&w.alert.id);
        a.action.push(w.action);
        a.notice.push(&w.notice);
        a.patient.push(&w.alert.patient);
        a.rule_id.push(&w.alert.rule_id);
        a.severity.push(w.alert.severity.name());
        a.status.push(w.alert.status.name());
        a.opened_utc.push(w.alert.opened_utc);
        a.updated_utc.push(w.alert.updated_utc);
        a.body.push(&w.alert_json);
        // Below the push threshold: stored, and summarised in the patient's digest instead.
        a.pushed.push(w.notify);
    }
    let sink_names: Vec<&'static str> = sinks.iter().map(|s| s.name()).collect();
    // The history rows of every patient in two statements: pruned ones out, new ones in.
    let (mut gone_patients, mut gone_ids) = (Vec::new(), Vec::new());
    let mut new = HistoryColumns::default();
    for (patient, state) in states {
        for id in &state.history_removed {
            gone_patients.push(*patient);
            gone_ids.push(id.as_str());
        }
        for r in &state.history_added {
            new.patient.push(*patient);
            new.reading_id.push(&r.reading_id);
            new.time_utc.push(r.time_utc);
            new.seq.push(r.seq);
            new.entry.push(&r.entry);
        }
    }
    // The states, column by column (one `unnest`).
    let patients: Vec<&str> = states.iter().map(|(p, _)| *p).collect();
    let jsons: Vec<&str> = states.iter().map(|(_, s)| s.json.as_str()).collect();
    let deadlines: Vec<Option<i64>> = states.iter().map(|(_, s)| s.next_deadline_utc).collect();
    let revs: Vec<i64> = states.iter().map(|(_, s)| s.history_rev).collect();
    let mut futs = Vec::new();
    if !writes.is_empty() {
        let p: Vec<&P<'_>> = vec![
            &a.event_id,
            &a.alert_id,
            &a.action,
            &a.notice,
            &a.patient,
            &a.rule_id,
            &a.severity,
            &a.status,
            &a.opened_utc,
            &a.updated_utc,
            &a.body,
            &a.pushed,
            &now_ms,
            &sink_names,
        ];
        futs.push(tx.execute_raw(&st.write_alerts, p));
    }
    if !patients.is_empty() {
        let p: Vec<&P<'_>> = vec![&patients, &jsons, &deadlines, &revs, &now_ms];
        futs.push(tx.execute_raw(&st.save_states, p));
    }
    if !gone_ids.is_empty() {
        let p: Vec<&P<'_>> = vec![&gone_patients, &gone_ids];
        futs.push(tx.execute_raw(&st.delete_history, p));
    }
    if !new.patient.is_empty() {
        let p: Vec<&P<'_>> = vec![
            &new.patient,
            &new.reading_id,
            &new.time_utc,
            &new.seq,
            &new.entry,
        ];
        futs.push(tx.execute_raw(&st.insert_history, p));
    }
    futures_util::future::try_join_all(futs).await?;
    Ok(())
}

/// Alert changes to write, column by column (one `unnest`).
#[derive(Default)]
struct AlertColumns<'a> {
    event_id: Vec<&'a str>,
    alert_id: Vec<&'a str>,
    action: Vec<&'a str>,
    notice: Vec<&'a str>,
    patient: Vec<&'a str>,
    rule_id: Vec<&'a str>,
    severity: Vec<&'static str>,
    status: Vec<&'static str>,
    opened_utc: Vec<i64>,
    updated_utc: Vec<i64>,
    body: Vec<&'a str>,
    pushed: Vec<bool>,
}

/// History rows to insert, column by column (one `unnest`).
#[derive(Default)]
struct HistoryColumns<'a> {
    patient: Vec<&'a str>,
    reading_id: Vec<&'a str>,
    time_utc: Vec<i64>,
    seq: Vec<i64>,
    entry: Vec<&'a str>,
}

fn reading_row(r: &Row) -> ReadingRow {
    let payload: String = r.get(6);
    ReadingRow {
        id: r.get(0),
        patient: r.get(1),
        gateway: r.get(2),
        kind: r.get(3),
        time_utc: r.get(4),
        eval_error: r.get(5),
        instance: r.get(7),
        reading: serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload)),
    }
}

const READING_COLUMNS: &str = "id, patient, gateway, kind, time_utc, eval_error, payload, instance";

/// One open transaction, for the shared batch loop.
struct PgBatch<'a, 'c> {
    tx: &'a Transaction<'c>,
    st: &'a Statements,
}

impl BatchTx for PgBatch<'_, '_> {
    async fn begin(
        &mut self,
        patients: &[&str],
        readings: &ReadingColumns<'_>,
        reports: bool,
        now_ms: i64,
        instance: &str,
    ) -> Result<Begun, StoreError> {
        let (tx, st) = (self.tx, self.st);
        // The patients' locks, the readings and the reports, sent together: the server runs them in
        // this order, so the readings are stored and the reports read under the locks.
        let lock = async {
            if patients.is_empty() {
                Ok(HashMap::new())
            } else {
                lock_states(tx, st, patients, now_ms).await
            }
        };
        let insert = async {
            if readings.id.is_empty() {
                return Ok(Vec::new());
            }
            let r = readings;
            let params: [&P<'_>; 10] = [
                &r.id,
                &r.patient,
                &r.gateway,
                &r.kind,
                &r.time_utc,
                &r.received_utc,
                &r.payload,
                &r.eval_error,
                &now_ms,
                &instance,
            ];
            Ok::<_, StoreError>(tx.query(&st.insert_readings, &params).await?)
        };
        let about = async {
            if !reports {
                return Ok(None);
            }
            Ok::<_, StoreError>(Some(tx.query(&st.reports, &[&readings.id]).await?))
        };
        let (states, inserted, about) =
            futures_util::future::try_join3(lock, insert, about).await?;
        Ok(Begun {
            states,
            new_ids: inserted.into_iter().map(|r| r.get(0)).collect(),
            reports: about.map(|rows| rows.iter().map(report_about).collect()),
        })
    }

    async fn stored_payloads(
        &mut self,
        ids: &[&str],
    ) -> Result<HashMap<String, String>, StoreError> {
        Ok(self
            .tx
            .query(
                "SELECT id, payload FROM readings WHERE id = ANY($1::text[])",
                &[&ids],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
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
            .execute(
                batch::sql::INSERT_REPORT,
                &[
                    &msg.id,
                    &msg.reading_id,
                    &msg.patient,
                    &msg.gateway,
                    &super::symptoms_column(msg.symptom_set()),
                    &report.answered_utc,
                    &now_ms,
                    &instance,
                    &report.payload,
                    &report.eval_error,
                ],
            )
            .await?;
        if n > 0 {
            return Ok(None);
        }
        let stored: String = self
            .tx
            .query_one(batch::sql::STORED_REPORT, &[&msg.id])
            .await?
            .get(0);
        Ok(Some(stored))
    }

    async fn insert_once(
        &mut self,
        sql: &'static str,
        [id, a, b]: [&str; 3],
        now_ms: i64,
        payload: &str,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(sql, &[&id, &a, &b, &now_ms, &payload])
            .await?;
        Ok(())
    }

    async fn reports_about(
        &mut self,
        reading_ids: &[&str],
    ) -> Result<Vec<ReportAbout>, StoreError> {
        let rows = self.tx.query(&self.st.reports, &[&reading_ids]).await?;
        Ok(rows.iter().map(report_about).collect())
    }

    async fn bp_history(
        &mut self,
        patients: &[&str],
    ) -> Result<HashMap<String, Vec<HistoryRow>>, StoreError> {
        let rows = self.tx.query(&self.st.history, &[&patients]).await?;
        let mut out: HashMap<String, Vec<HistoryRow>> = HashMap::with_capacity(patients.len());
        for r in rows {
            out.entry(r.get(0)).or_default().push(HistoryRow {
                reading_id: r.get(1),
                time_utc: r.get(2),
                seq: r.get(3),
                entry: r.get(4),
            });
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
        write_all(self.tx, self.st, writes, sinks, states, now_ms).await
    }
}

/// A row of [`REPORTS_ABOUT`].
fn report_about(r: &Row) -> ReportAbout {
    ReportAbout {
        reading_id: r.get(0),
        id: r.get(1),
        patient: r.get(2),
        symptoms: super::symptoms_of_column(r.get(3)),
    }
}

impl Store for PgStore {
    async fn ingest(
        &self,
        batch: Vec<Inbound>,
        ev: Arc<Evaluator>,
        instance: &str,
        now_ms: i64,
    ) -> Result<Vec<Stored>, StoreError> {
        let prepared: Vec<Prepared> = batch.iter().map(prepare).collect();
        let mut client = self.get(&self.writer).await?;
        let st = client.statements().await?;
        let tx = client.transaction().await?;
        let out = batch::ingest(
            &mut PgBatch { tx: &tx, st: &st },
            &batch,
            &prepared,
            &ev,
            instance,
            now_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn tick(&self, ev: Arc<Evaluator>, now_utc: i64) -> Result<usize, StoreError> {
        self.pass(
            "SELECT patient FROM patient_state UNION SELECT patient FROM patient_settings
             ORDER BY 1",
            &[],
            ev,
            now_utc,
            Evaluator::on_tick,
        )
        .await
    }

    async fn deadlines(&self, ev: Arc<Evaluator>, now_utc: i64) -> Result<usize, StoreError> {
        self.pass(
            "SELECT patient FROM patient_state WHERE next_deadline_utc <= $1 ORDER BY 1",
            &[&now_utc],
            ev,
            now_utc,
            Evaluator::on_deadlines,
        )
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
        let severities = severities_below(below);
        let mut client = self.get(&self.writer).await?;
        let tx = client.transaction().await?;
        let rows: Vec<(String, DigestItem)> = tx
            .query(
                "SELECT patient, rule_id, severity, count(*), min(opened_utc), max(updated_utc)
                 FROM alerts WHERE updated_utc >= $1 AND updated_utc < $2 AND severity = ANY($3)
                 GROUP BY patient, rule_id, severity ORDER BY patient, rule_id, severity",
                &[&from_utc, &to_utc, &severities],
            )
            .await?
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    DigestItem {
                        rule_id: r.get(1),
                        severity: r.get(2),
                        alerts: r.get(3),
                        first_utc: r.get(4),
                        last_utc: r.get(5),
                    },
                )
            })
            .collect();
        let mut new = 0;
        for (digest_id, event_id, notice) in digests(rows, from_utc, to_utc)? {
            let n = tx
                .execute(
                    "INSERT INTO alert_events (id, alert_id, action, created_ms, notice)
                     VALUES ($1, $2, 'digest', $3, $4) ON CONFLICT (id) DO NOTHING",
                    &[&event_id, &digest_id, &now_ms, &notice],
                )
                .await?;
            if n == 0 {
                continue; // another instance, or an earlier pass, wrote it
            }
            new += 1;
            for s in &sinks {
                tx.execute(
                    batch::sql::INSERT_OUTBOX,
                    &[&event_id, &s.name(), &notice, &now_ms],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(new)
    }

    async fn next_deadline(&self) -> Result<Option<i64>, StoreError> {
        let client = self.get(&self.reader).await?;
        let row = client
            .query_one("SELECT min(next_deadline_utc) FROM patient_state", &[])
            .await?;
        Ok(row.get(0))
    }

    async fn claim(
        &self,
        sink: Sink,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: i64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let client = self.get(&self.writer).await?;
        let rows = client
            .query(
                "UPDATE outbox SET lease_owner = $1, lease_until_ms = $2
                 WHERE seq IN (SELECT seq FROM outbox
                               WHERE sink = $3 AND delivered_ms IS NULL AND next_attempt_ms <= $4
                                 AND lease_until_ms <= $4
                               ORDER BY seq LIMIT $5 FOR UPDATE SKIP LOCKED)
                 RETURNING seq, event_id, payload, attempts",
                &[&owner, &lease_until_ms, &sink.name(), &now_ms, &limit],
            )
            .await?;
        let mut items: Vec<OutboxItem> = rows
            .into_iter()
            .map(|r| OutboxItem {
                seq: r.get(0),
                event_id: r.get(1),
                payload: r.get(2),
                attempts: r.get(3),
            })
            .collect();
        items.sort_by_key(|i| i.seq);
        Ok(items)
    }

    async fn delivered(&self, seq: i64, owner: &str, now_ms: i64) -> Result<bool, StoreError> {
        let client = self.get(&self.writer).await?;
        let n = client
            .execute(
                "UPDATE outbox SET delivered_ms = $3, lease_owner = NULL
                 WHERE seq = $1 AND lease_owner = $2 AND delivered_ms IS NULL",
                &[&seq, &owner, &now_ms],
            )
            .await?;
        Ok(n == 1)
    }

    async fn failed(
        &self,
        seq: i64,
        owner: &str,
        next_attempt_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let client = self.get(&self.writer).await?;
        client
            .execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = $3, lease_owner = NULL,
                   lease_until_ms = 0, last_error = $4
                 WHERE seq = $1 AND lease_owner = $2 AND delivered_ms IS NULL",
                &[&seq, &owner, &next_attempt_ms, &error],
            )
            .await?;
        Ok(())
    }

    async fn put_patient(
        &self,
        patient: &str,
        settings_json: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let client = self.get(&self.writer).await?;
        client
            .execute(
                "INSERT INTO patient_settings (patient, settings, updated_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (patient) DO UPDATE SET settings = excluded.settings,
                   updated_ms = excluded.updated_ms",
                &[&patient, &settings_json, &now_ms],
            )
            .await?;
        Ok(())
    }

    async fn patients(&self) -> Result<Vec<String>, StoreError> {
        let client = self.get(&self.reader).await?;
        Ok(client
            .query(
                "SELECT settings FROM patient_settings ORDER BY patient",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn readings_of(&self, patient: &str, limit: i64) -> Result<Vec<ReadingRow>, StoreError> {
        let client = self.get(&self.reader).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {READING_COLUMNS} FROM readings WHERE patient = $1
                     ORDER BY time_utc DESC, id LIMIT $2"
                ),
                &[&patient, &limit],
            )
            .await?;
        Ok(rows.iter().map(reading_row).collect())
    }

    async fn reading(&self, id: &str) -> Result<Option<ReadingRow>, StoreError> {
        let client = self.get(&self.reader).await?;
        let row = client
            .query_opt(
                &format!("SELECT {READING_COLUMNS} FROM readings WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(reading_row))
    }

    async fn alerts_of(&self, patient: &str, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        let client = self.get(&self.reader).await?;
        let rows = client
            .query(
                "SELECT id, patient, rule_id, severity, status, acknowledged_by, acknowledged_ms, body
                 FROM alerts WHERE patient = $1 ORDER BY opened_utc DESC, id LIMIT $2",
                &[&patient, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let body: String = r.get(7);
                AlertRow {
                    id: r.get(0),
                    patient: r.get(1),
                    rule_id: r.get(2),
                    severity: r.get(3),
                    status: r.get(4),
                    acknowledged_by: r.get(5),
                    acknowledged_ms: r.get(6),
                    alert: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
                }
            })
            .collect())
    }

    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        ev: Arc<Evaluator>,
        now_ms: i64,
    ) -> Result<AckResult, StoreError> {
        let mut client = self.get(&self.writer).await?;
        let st = client.statements().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT patient, acknowledged_by FROM alerts WHERE id = $1 FOR UPDATE",
                &[&alert_id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(AckResult::NotFound);
        };
        let patient: String = row.get(0);
        let ack_by: Option<String> = row.get(1);
        if ack_by.is_some() {
            return Ok(AckResult::Already);
        }
        tx.execute(
            "UPDATE alerts SET acknowledged_by = $2, acknowledged_ms = $3 WHERE id = $1",
            &[&alert_id, &by, &now_ms],
        )
        .await?;
        batch::pass_patient(
            &mut PgBatch { tx: &tx, st: &st },
            &patient,
            &ev,
            now_ms,
            |ev, p, engine| Ok((ev.acknowledge(p, engine, alert_id)?.0, Vec::new())),
        )
        .await?;
        tx.commit().await?;
        Ok(AckResult::Acknowledged)
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let client = self.get(&self.reader).await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM alerts),
                        (SELECT count(*) FROM alert_events),
                        (SELECT count(*) FROM outbox WHERE delivered_ms IS NULL),
                        (SELECT count(*) FROM outbox WHERE delivered_ms IS NOT NULL),
                        (SELECT count(*) FROM bad_messages),
                        (SELECT count(DISTINCT event_id) FROM outbox),
                        (SELECT count(*) FROM symptom_reports)",
                &[],
            )
            .await?;
        Ok(Counts {
            readings: row.get(0),
            alerts: row.get(1),
            alert_events: row.get(2),
            outbox_pending: row.get(3),
            outbox_delivered: row.get(4),
            bad_messages: row.get(5),
            notified_events: row.get(6),
            symptom_reports: row.get(7),
        })
    }

    async fn bad_messages(&self, limit: i64) -> Result<Vec<BadRow>, StoreError> {
        let client = self.get(&self.reader).await?;
        let rows = client
            .query(
                "SELECT topic, error, received_ms FROM bad_messages
                 ORDER BY received_ms DESC, id LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| BadRow {
                topic: r.get(0),
                error: r.get(1),
                received_ms: r.get(2),
            })
            .collect())
    }
}
