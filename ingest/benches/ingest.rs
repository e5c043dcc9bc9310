//! `cargo bench -p ingest --bench ingest [-- --quick]`: ingest throughput on this machine, printed,
//! asserting nothing.
//!
//! For SQLite (a file, WAL, `synchronous = FULL`) and PostgreSQL (a server the bench starts, `fsync = on`;
//! skipped when not installed), in the same run:
//!
//! - **raw INSERT ceiling** — the same JSON payloads into a bare `(id PRIMARY KEY, payload)` table, in
//!   transactions of the same batch size, `ON CONFLICT DO NOTHING`: what the database alone allows;
//! - **stored + evaluated** — [`Store::ingest`]: parse, idempotent insert, the patient's engine state
//!   loaded, the rule engine run, alerts and outbox rows written, state saved, one commit per batch;
//! - the same in backlog order (each patient's readings together, as a gateway catching up after days
//!   offline sends them: one engine run and one state write per patient per batch);
//! - the same with every reading in range (no alert raised): what the alert writes cost, and what is
//!   left without them (the readings, their indexes, the engine states);
//! - the same with one message per transaction (the worst case: a broker handing over one message at a
//!   time);
//! - SQLite: ingestion while the time-based rules run over every patient (the window pass): how long
//!   the pass takes, and the slowest batch stored meanwhile (the pass holds the writer one patient at a
//!   time, so a batch waits for one patient's transaction, not for the pass).
//!
//! After each database's table: the bytes written per batch (SQLite: what this process wrote, its WAL;
//! PostgreSQL: the server's WAL), which is what a commit waits for on a busy disk; and the headline
//! ratios as `RATIO ingest_<db>[_backlog|_in_range]_vs_raw_insert X` lines, comparable across runs and machines.
//!
//! The readings: 200 patients, glucose and blood pressure alternating, 1 in 12 of each kind abnormal
//! (50 mg/dL, 185 mmHg systolic), the rest within the CN pre-meal and BP targets, times a
//! few minutes apart.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest::evaluate::{Evaluator, Sink};
use ingest::store::{AnyStore, Channel, Inbound, Store};
use ingest::testing::{TempPostgres, bp_message, glucose_message};
use protocol::rules::RuleSet;

const T0: i64 = 1_795_420_800;
const BATCH: usize = 64;

/// `catch_up`: the same readings, but each patient's together (a gateway uploading days of backlog),
/// so a batch holds many readings of one patient. `abnormal`: 1 in 12 of each kind out of range (the
/// bench's mix); without, every reading is in range and raises nothing.
fn messages_in(n: usize, prefix: &str, catch_up: bool, abnormal: bool) -> Vec<Inbound> {
    (0..n)
        .map(|i| {
            let patient = if catch_up {
                format!("p-{:04}", i * 200 / n)
            } else {
                format!("p-{:04}", i % 200)
            };
            let t = T0 + i64::try_from(i).unwrap() * 7;
            let id = format!("{prefix}-{i}");
            let payload = if i % 2 == 0 {
                let mg = if abnormal && i % 12 == 0 {
                    50
                } else {
                    90 + (i % 20) as u32
                };
                glucose_message(&id, &patient, mg, t)
            } else {
                let sys = if abnormal && i % 12 == 1 {
                    185
                } else {
                    110 + (i % 30) as u32
                };
                bp_message(
                    &id,
                    &patient,
                    sys,
                    70 + (i % 15) as u32,
                    60 + (i % 30) as u32,
                    t,
                )
            };
            Inbound {
                topic: "phg/v1/gw-test/readings".into(),
                channel: Channel::Readings,
                payload: payload.into_bytes(),
                max_len: None,
            }
        })
        .collect()
}

fn messages(n: usize, prefix: &str) -> Vec<Inbound> {
    messages_in(n, prefix, false, true)
}

/// Bytes this process has written (`wchar` in `/proc/self/io`; 0 where there is none): what SQLite
/// wrote to its WAL, which is what a commit waits for.
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The server's WAL position (bytes): the difference over a run is the WAL it wrote.
async fn wal_position(url: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// `  written per batch of 64: …` from the bytes written by the raw run, the stored run, the stored
/// run in backlog order and the stored run with every reading in range, over `n` readings.
fn per_batch(what: &str, n: usize, [raw, stored, backlog, in_range]: [u64; 4]) {
    let kb = |b: u64| b as f64 / 1024.0 / (n as f64 / BATCH as f64);
    println!(
        "  {what} per batch of {BATCH}: raw {:.0} KB, stored {:.0} KB, backlog order {:.0} KB, in range {:.0} KB",
        kb(raw),
        kb(stored),
        kb(backlog),
        kb(in_range)
    );
}

/// Where a stored batch's bytes go: the mean and largest size of a stored row, per table, after a run
/// (the engine state is rewritten whole at every batch that touches its patient).
fn row_sizes(path: &std::path::Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    for (table, column) in [
        ("readings", "payload"),
        ("patient_state", "state"),
        ("alert_events", "notice"),
        ("alerts", "body"),
        ("outbox", "payload"),
        ("bp_history", "entry"),
    ] {
        let (rows, mean, max): (i64, f64, i64) = c
            .query_row(
                &format!(
                    "SELECT count(*), coalesce(avg(length({column})), 0), coalesce(max(length({column})), 0) FROM {table}"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        println!("  {table}.{column}: {rows} rows, mean {mean:.0} B, largest {max} B");
    }
}

fn rate(n: usize, d: Duration) -> String {
    format!("{:>9.0} readings/s", n as f64 / d.as_secs_f64())
}

/// The raw ceiling's table: `Bare` is `(id PRIMARY KEY, payload)`; `ByPatient` adds the patient and the
/// reading's time with an index on them — the least a store must write for the CRM to read a patient's
/// readings (ingest's `readings` table has that index), before any evaluation.
#[derive(Clone, Copy, PartialEq)]
enum RawTable {
    Bare,
    ByPatient,
}

impl RawTable {
    const fn create(self) -> &'static str {
        match self {
            RawTable::Bare => {
                "CREATE TABLE IF NOT EXISTS raw (id TEXT PRIMARY KEY, payload TEXT NOT NULL)"
            }
            RawTable::ByPatient => {
                "CREATE TABLE IF NOT EXISTS raw (id TEXT PRIMARY KEY, payload TEXT NOT NULL,
                   patient TEXT NOT NULL, time TEXT NOT NULL);
                 CREATE INDEX IF NOT EXISTS raw_by_patient ON raw (patient, time)"
            }
        }
    }
}

/// A message's id, and its patient and time (RFC 3339, which sorts as the time does).
fn raw_keys(m: &Inbound) -> (String, String, String) {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    let text = |f: &serde_json::Value| f.as_str().unwrap().to_owned();
    (
        text(&v["id"]),
        text(&v["patient"]),
        text(&v["time"]["corrected"]),
    )
}

fn raw_sqlite(path: &std::path::Path, msgs: &[Inbound], batch: usize, table: RawTable) -> Duration {
    let mut c = rusqlite::Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "synchronous", "FULL").unwrap();
    c.execute_batch(table.create()).unwrap();
    let t = Instant::now();
    for chunk in msgs.chunks(batch) {
        let tx = c.transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached(match table {
                    RawTable::Bare => {
                        "INSERT INTO raw (id, payload) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING"
                    }
                    RawTable::ByPatient => {
                        "INSERT INTO raw (id, payload, patient, time) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (id) DO NOTHING"
                    }
                })
                .unwrap();
            for m in chunk {
                let (id, patient, time) = raw_keys(m);
                let payload = std::str::from_utf8(&m.payload).unwrap();
                match table {
                    RawTable::Bare => st.execute(rusqlite::params![id, payload]),
                    RawTable::ByPatient => {
                        st.execute(rusqlite::params![id, payload, patient, time])
                    }
                }
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    t.elapsed()
}

async fn raw_pg(url: &str, msgs: &[Inbound], batch: usize, table: RawTable) -> Duration {
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.batch_execute(table.create()).await.unwrap();
    let t = Instant::now();
    for chunk in msgs.chunks(batch) {
        let (mut ids, mut patients, mut times) = (Vec::new(), Vec::new(), Vec::new());
        let mut payloads: Vec<&str> = Vec::new();
        for m in chunk {
            let (id, patient, time) = raw_keys(m);
            ids.push(id);
            patients.push(patient);
            times.push(time);
            payloads.push(std::str::from_utf8(&m.payload).unwrap());
        }
        let tx = client.transaction().await.unwrap();
        match table {
            RawTable::Bare => tx
                .execute(
                    "INSERT INTO raw (id, payload) SELECT * FROM unnest($1::text[], $2::text[])
                     ON CONFLICT (id) DO NOTHING",
                    &[&ids, &payloads],
                )
                .await
                .unwrap(),
            RawTable::ByPatient => tx
                .execute(
                    "INSERT INTO raw (id, payload, patient, time)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                     ON CONFLICT (id) DO NOTHING",
                    &[&ids, &payloads, &patients, &times],
                )
                .await
                .unwrap(),
        };
        tx.commit().await.unwrap();
    }
    t.elapsed()
}

async fn stored(url: &str, msgs: &[Inbound], batch: usize) -> (Duration, i64) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = Arc::new(Evaluator::new(
        RuleSet::default_rules().unwrap(),
        vec![Sink::Mqtt, Sink::Webhook],
    ));
    let t = Instant::now();
    for chunk in msgs.chunks(batch) {
        store
            .ingest(chunk.to_vec(), Arc::clone(&ev), "bench", ingest::now_ms())
            .await
            .unwrap();
    }
    let d = t.elapsed();
    (d, store.counts().await.unwrap().alert_events)
}

/// Runs the window pass on `url`'s store a week after the readings while storing batches of `more`
/// until it ends: (the pass's duration, batches stored meanwhile, the slowest of them).
async fn ingest_during_window_pass(url: &str, more: &[Inbound]) -> (Duration, usize, Duration) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = Arc::new(Evaluator::new(
        RuleSet::default_rules().unwrap(),
        vec![Sink::Mqtt, Sink::Webhook],
    ));
    let (pass_store, pass_ev) = (store.clone(), Arc::clone(&ev));
    let pass = tokio::spawn(async move {
        let t = Instant::now();
        pass_store.tick(pass_ev, T0 + 8 * 86_400).await.unwrap();
        t.elapsed()
    });
    let (mut batches, mut slowest) = (0, Duration::ZERO);
    for chunk in more.chunks(BATCH) {
        if pass.is_finished() {
            break;
        }
        let t = Instant::now();
        store
            .ingest(chunk.to_vec(), Arc::clone(&ev), "bench", ingest::now_ms())
            .await
            .unwrap();
        slowest = slowest.max(t.elapsed());
        batches += 1;
    }
    (pass.await.unwrap(), batches, slowest)
}

/// Prints one database's figures: `(n, n1)` readings batched and one per transaction; the times of the
/// raw ceiling and the stored run batched, the same one per transaction, the stored run in backlog
/// order, in range, and the raw ceiling with the patient index; then the headline ratios as `RATIO ingest_<key>_vs_raw_insert X` lines, comparable across runs
/// (absolute rates depend on the machine and its load; a ratio within one run much less).
fn report(label: &str, key: &str, (n, n1): (usize, usize), times: [Duration; 7], alerts: i64) {
    let [raw, d, raw1, d1, dc, dn, raw_indexed] = times;
    println!("{label}");
    println!("  raw INSERT ceiling, batch {BATCH:>3}: {}", rate(n, raw));
    println!(
        "  raw INSERT + a (patient, time) index, batch {BATCH:>3}: {}",
        rate(n, raw_indexed)
    );
    println!(
        "  stored + evaluated, batch {BATCH:>3}: {}  ({alerts} alert events)",
        rate(n, d)
    );
    println!("  raw INSERT ceiling, batch   1: {}", rate(n1, raw1));
    println!("  stored + evaluated, batch   1: {}", rate(n1, d1));
    println!(
        "  stored + evaluated, batch {BATCH:>3}, backlog order: {}",
        rate(n, dc)
    );
    println!(
        "  stored + evaluated, batch {BATCH:>3}, every reading in range (no alert): {}",
        rate(n, dn)
    );
    // Same n on both sides, so the ratio of rates is the inverse ratio of times.
    let ratio = |stored: Duration| raw.as_secs_f64() / stored.as_secs_f64();
    println!("RATIO ingest_{key}_vs_raw_insert {:.2}", ratio(d));
    println!("RATIO ingest_{key}_backlog_vs_raw_insert {:.2}", ratio(dc));
    println!("RATIO ingest_{key}_in_range_vs_raw_insert {:.2}", ratio(dn));
    // Not ingest: the bound that any store readable by patient starts from.
    println!(
        "RATIO {key}_insert_with_patient_index_vs_raw_insert {:.2}",
        ratio(raw_indexed)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, n1) = if quick { (4_000, 500) } else { (20_000, 2_000) };
    let msgs = messages(n, "r");
    let backlog = messages_in(n, "c", true, true);
    // The same readings, every one in range: what the alert writes cost (the difference), and what is
    // left when nothing is raised (readings, their indexes, the engine states).
    let in_range = messages_in(n, "n", false, false);
    let singles = messages(n1, "s");
    println!(
        "ingest bench: {n} readings in batches of {BATCH}, {n1} one per transaction; 200 patients; {} cores",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    let dir = tempfile::tempdir().unwrap();
    let w0 = written_bytes();
    let raw = raw_sqlite(&dir.path().join("raw.sqlite"), &msgs, BATCH, RawTable::Bare);
    let w_raw = written_bytes() - w0;
    let raw1 = raw_sqlite(&dir.path().join("raw1.sqlite"), &singles, 1, RawTable::Bare);
    let raw_indexed = raw_sqlite(
        &dir.path().join("raw_indexed.sqlite"),
        &msgs,
        BATCH,
        RawTable::ByPatient,
    );
    let url = format!("sqlite://{}", dir.path().join("ingest.sqlite").display());
    let w0 = written_bytes();
    let (d, alerts) = stored(&url, &msgs, BATCH).await;
    let w_stored = written_bytes() - w0;
    let url1 = format!("sqlite://{}", dir.path().join("ingest1.sqlite").display());
    let (d1, _) = stored(&url1, &singles, 1).await;
    let urlc = format!("sqlite://{}", dir.path().join("ingestc.sqlite").display());
    let w0 = written_bytes();
    let (dc, _) = stored(&urlc, &backlog, BATCH).await;
    let w_backlog = written_bytes() - w0;
    let urln = format!("sqlite://{}", dir.path().join("ingestn.sqlite").display());
    let w0 = written_bytes();
    let (dn, _) = stored(&urln, &in_range, BATCH).await;
    let w_in_range = written_bytes() - w0;
    report(
        "SQLite (WAL, synchronous=FULL)",
        "sqlite",
        (n, n1),
        [raw, d, raw1, d1, dc, dn, raw_indexed],
        alerts,
    );
    per_batch("written", n, [w_raw, w_stored, w_backlog, w_in_range]);
    row_sizes(&dir.path().join("ingest.sqlite"));
    let (pass, batches, slowest) = ingest_during_window_pass(&url, &messages(n, "w")).await;
    println!(
        "  window pass over 200 patients: {:.0} ms; meanwhile {batches} batches of {BATCH} stored, the slowest in {:.1} ms",
        pass.as_secs_f64() * 1000.0,
        slowest.as_secs_f64() * 1000.0
    );

    match TempPostgres::start(true) {
        Ok(Some(pg)) => {
            let raw_url = pg.create_database("raw").await.unwrap();
            let wal0 = wal_position(&raw_url).await;
            let raw = raw_pg(&raw_url, &msgs, BATCH, RawTable::Bare).await;
            let wal_raw = wal_position(&raw_url).await - wal0;
            let raw1_url = pg.create_database("raw1").await.unwrap();
            let raw1 = raw_pg(&raw1_url, &singles, 1, RawTable::Bare).await;
            let indexed_url = pg.create_database("raw_indexed").await.unwrap();
            let raw_indexed = raw_pg(&indexed_url, &msgs, BATCH, RawTable::ByPatient).await;
            let url = pg.create_database("ingest").await.unwrap();
            let wal0 = wal_position(&raw_url).await;
            let (d, alerts) = stored(&url, &msgs, BATCH).await;
            let wal_stored = wal_position(&raw_url).await - wal0;
            let url1 = pg.create_database("ingest1").await.unwrap();
            let (d1, _) = stored(&url1, &singles, 1).await;
            let urlc = pg.create_database("ingestc").await.unwrap();
            let wal0 = wal_position(&raw_url).await;
            let (dc, _) = stored(&urlc, &backlog, BATCH).await;
            let wal_backlog = wal_position(&raw_url).await - wal0;
            let urln = pg.create_database("ingestn").await.unwrap();
            let wal0 = wal_position(&raw_url).await;
            let (dn, _) = stored(&urln, &in_range, BATCH).await;
            let wal_in_range = wal_position(&raw_url).await - wal0;
            report(
                "PostgreSQL (local server, fsync=on, synchronous_commit=on)",
                "postgres",
                (n, n1),
                [raw, d, raw1, d1, dc, dn, raw_indexed],
                alerts,
            );
            let wal = |b: i64| u64::try_from(b).unwrap_or(0);
            per_batch(
                "WAL written",
                n,
                [
                    wal(wal_raw),
                    wal(wal_stored),
                    wal(wal_backlog),
                    wal(wal_in_range),
                ],
            );
        }
        Ok(None) => println!("PostgreSQL: {}", ingest::testing::SKIP_MESSAGE),
        Err(e) => println!("PostgreSQL did not start: {e}"),
    }
}
