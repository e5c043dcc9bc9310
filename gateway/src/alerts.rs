//! Edge alerts: the `protocol` rule engine run on the gateway (DESIGN.md "Alerts", issue 5 part 2).
//!
//! Ingest is authoritative; the edge copy is for the kiosk's instant feedback and for the hours a home
//! gateway is offline. After a reading is **accepted** (fsynced in the journal) the session evaluates it
//! here; every [`AlertAction`] becomes a record on `…/alerts`, journaled like a reading and published by the
//! uplink.
//!
//! Time drives two kinds of work. **Deadlines** — a pending alert whose repeat never came is raised
//! anyway 15 minutes on (a missing repeat never silences a critical or urgent alert, CLINICAL.md §4.2),
//! an unacknowledged CRITICAL/URGENT alert moves to the next tier (§4.3) — fire at their second:
//! [`EdgeAlerts::wait_due`] sleeps until the engine's next deadline and wakes early when a reading
//! changes it, then [`EdgeAlerts::on_deadlines`] runs them. **Window rules** (7-day average, trend,
//! adherence) are about days and run on the `[alerts] tick_s` interval ([`EdgeAlerts::on_tick`], which
//! runs the deadlines too). Issue 11 item 13: deadlines used to wait for that interval.
//!
//! Patient settings (profile, overrides with guard-rails) come from the CRM's configuration
//! ([`EdgeAlerts::set_patients`]): all of them are validated before any is applied.
//!
//! The engine's state (open episodes, pending confirmations, the readings the window rules look back on)
//! is kept in a state file ([`EdgeAlerts::open`]) so that a restart or a power cut does not open an
//! ongoing episode a second time. The Pi's SD card wears with every write, so the file is not rewritten
//! per reading (issue 14 item 6): it is a *snapshot*, replaced whole ([`crate::state_file::replace`]:
//! temporary file, fsync, rename, mode 0600) every [`SNAPSHOT_EVERY`] while readings arrive, at once
//! after a decision that no journaled reading explains (a deadline passed, an escalation, the patient's
//! symptoms: a replay could not make them again), and at shutdown. The journal is the source for what
//! came after it: the snapshot names the journal seqs of the readings it includes (`through`, and the few
//! evaluated out of order beyond it), the journal keeps the records after `through` on disk even once
//! they are acked ([`KeepAfter`]), and at start [`EdgeAlerts::replay`] runs those readings through the
//! engine again — each exactly once, rebuilt from the reading message as ingest rebuilds it
//! ([`protocol::engine_input`]). A reading accepted but not yet evaluated when the power went is
//! evaluated then, and its alerts journaled: the snapshot loses nothing the journal accepted.
//!
//! A decision a *reading* caused (an alert opened, confirmed, closed by it) does not force a snapshot:
//! the replay makes it again from the same reading, and the alert record journaled for it the first time
//! is among the kept records, so the replay journals only the decisions whose records are not there
//! (the power went between the reading and its alert record). Until 6 December every such decision
//! replaced the state file at once, which took the disk writes with alerts to 2.9–3.4 KB a reading.
//! Ingest, which keeps its state transactionally, stays the one the CRM trusts for episodes.
//!
//! `through` advances only at a quiet moment: when every reading handed to the journal for evaluation
//! ([`EdgeAlerts::ticket`]) has been evaluated (or refused), all readings at or below the highest seq
//! evaluated are in the state, and all later ones are not.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::rules::{
    AlertAction, Engine, EngineState, OverrideError, PatientSettings, ReadingInput, RuleSet,
    Symptoms,
};
use protocol::wire::{AlertMessage, ReadingMessage, SymptomsMessage, Topics};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::journal::{KeepAfter, NewRecord, Record};

/// How often the state is saved while readings arrive and nothing is decided (a restart replays at most
/// this much of the journal).
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);

/// The state file's format: a snapshot with the journal seqs it includes. Version 1 (gateway 0.1 before
/// issue 14) was the bare engine state; it is still read (then nothing is replayed).
const STATE_FORMAT: u32 = 2;

/// The engine and where its alerts go.
#[derive(Debug)]
pub struct EdgeAlerts {
    inner: Mutex<Inner>,
    gateway_id: String,
    topics: Topics,
    state_file: Option<StateFile>,
    /// Readings handed to the journal for evaluation and not yet evaluated or refused ([`Ticket`]).
    in_flight: Arc<AtomicUsize>,
    /// Signalled after every reading: it may have set an earlier deadline than the one
    /// [`EdgeAlerts::wait_due`] sleeps for.
    changed: Notify,
}

/// The engine and which journaled readings its state includes.
#[derive(Debug)]
struct Inner {
    engine: Engine,
    book: Book,
}

/// Which journal seqs the engine's state includes.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Book {
    /// Every reading at or below this seq that was to be evaluated has been; `None`: unknown (a
    /// version 1 state file), nothing is replayed until the next quiet moment sets it.
    through: Option<u64>,
    /// Readings above `through` evaluated already (out of order, between quiet moments).
    also: Vec<u64>,
    /// The highest seq evaluated.
    #[serde(skip)]
    max_seen: Option<u64>,
    /// Evaluated since the last snapshot.
    #[serde(skip)]
    dirty: bool,
}

impl Book {
    fn evaluated(&mut self, seq: u64) {
        self.max_seen = self.max_seen.max(Some(seq));
        if self.through.is_none_or(|t| seq > t) {
            self.also.push(seq);
        }
        self.dirty = true;
    }

    /// Nothing is in flight: every reading up to the highest seen is in the state.
    fn quiet(&mut self) {
        if let Some(max) = self.max_seen {
            self.through = self.through.max(Some(max));
            let through = max;
            self.also.retain(|&s| s > through);
        }
    }

    /// Whether reading `seq` still has to be evaluated (a replay after a restart).
    fn wants(&self, seq: u64) -> bool {
        self.through.is_some_and(|t| seq > t) && !self.also.contains(&seq)
    }
}

/// The state file's content (format 2).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Snapshot<S> {
    format: u32,
    #[serde(flatten)]
    book: Book,
    state: S,
}

/// A reading on its way to the journal and then to [`EdgeAlerts::on_reading`]; dropping it unused (the
/// journal refused the reading) says it will not come.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`EdgeAlerts::wait_due`] woke up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// A confirmation or acknowledgement deadline: call [`EdgeAlerts::on_deadlines`].
    Deadline,
    /// The window-rule interval: call [`EdgeAlerts::on_tick`].
    Window,
}

/// Where the engine's state is kept between runs.
#[derive(Debug)]
struct StateFile {
    path: PathBuf,
    /// Snapshots taken (under the engine lock), numbered.
    taken: AtomicU64,
    /// The number of the snapshot on disk: a slower writer never replaces a newer snapshot.
    written: Mutex<u64>,
    /// The journal keeps the readings after the `through` of the snapshot on disk.
    keep: KeepAfter,
    /// When the last snapshot was taken.
    last: Mutex<Instant>,
    /// [`SNAPSHOT_EVERY`], shorter in tests.
    every: Duration,
}

/// A snapshot taken under the engine lock: its number, its bytes, its `through`.
type Taken = (u64, Vec<u8>, Option<u64>);

impl EdgeAlerts {
    /// An engine with `rules` and the `patients`' settings (every other patient on the rule file's
    /// default profile until the CRM says otherwise).
    ///
    /// # Errors
    /// The first invalid patient override.
    pub fn new(
        rules: RuleSet,
        patients: Vec<PatientSettings>,
        gateway_id: &str,
        topics: Topics,
    ) -> Result<EdgeAlerts, Box<OverrideError>> {
        Ok(EdgeAlerts {
            inner: Mutex::new(Inner {
                engine: Engine::with_state(rules, patients, EngineState::default())
                    .map_err(Box::new)?,
                book: Book::default(),
            }),
            gateway_id: gateway_id.to_owned(),
            topics,
            state_file: None,
            in_flight: Arc::new(AtomicUsize::new(0)),
            changed: Notify::new(),
        })
    }

    /// As [`EdgeAlerts::new`], with the engine's state read from `state_file` (when it exists) and kept
    /// there. A state file that cannot be read or parsed is reported and the engine starts afresh: edge
    /// alerts then behave as after a first start, and ingest's are unaffected. Open the journal with
    /// [`EdgeAlerts::keep_after`] and pass what it kept to [`EdgeAlerts::replay`].
    ///
    /// # Errors
    /// The first invalid patient override.
    pub fn open(
        rules: RuleSet,
        patients: Vec<PatientSettings>,
        gateway_id: &str,
        topics: Topics,
        state_file: &Path,
    ) -> Result<EdgeAlerts, Box<OverrideError>> {
        let afresh = |why: &dyn std::fmt::Display| {
            tracing::error!(path = %state_file.display(), error = %why, "edge alert state unreadable; the edge engine starts afresh");
            // Nothing is in the state: every reading the journal still has is replayed.
            (
                EngineState::default(),
                Book {
                    through: Some(0),
                    ..Book::default()
                },
            )
        };
        let (state, book) = match std::fs::read(state_file) {
            Ok(bytes) => parse_state(&bytes).unwrap_or_else(|e| afresh(&e)),
            // A first start: the journal's readings (if any) are all to be evaluated.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                EngineState::default(),
                Book {
                    through: Some(0),
                    ..Book::default()
                },
            ),
            Err(e) => afresh(&e),
        };
        let keep = KeepAfter::new(book.through);
        Ok(EdgeAlerts {
            inner: Mutex::new(Inner {
                engine: Engine::with_state(rules, patients, state).map_err(Box::new)?,
                book,
            }),
            gateway_id: gateway_id.to_owned(),
            topics,
            state_file: Some(StateFile {
                path: state_file.to_owned(),
                taken: AtomicU64::new(0),
                written: Mutex::new(0),
                keep,
                last: Mutex::new(Instant::now()),
                every: SNAPSHOT_EVERY,
            }),
            in_flight: Arc::new(AtomicUsize::new(0)),
            changed: Notify::new(),
        })
    }

    /// Saves the state at most every `every` while readings arrive (default [`SNAPSHOT_EVERY`]).
    #[must_use]
    pub fn snapshot_every(mut self, every: Duration) -> Self {
        if let Some(f) = &mut self.state_file {
            f.every = every;
        }
        self
    }

    /// What the journal must keep after acking for [`EdgeAlerts::replay`] ([`crate::journal::Journal::open_keeping`]);
    /// `None` without a state file.
    pub fn keep_after(&self) -> Option<KeepAfter> {
        self.state_file.as_ref().map(|f| f.keep.clone())
    }

    /// Takes a ticket for a reading about to be journaled, to be passed to [`EdgeAlerts::on_reading`]
    /// once it is accepted (or dropped if it is not).
    pub fn ticket(&self) -> Ticket {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ticket(self.in_flight.clone())
    }

    /// Evaluates again the readings the journal kept (`records`, from
    /// [`crate::journal::Journal::take_replay`]) that the state on disk does not include — those
    /// accepted after its snapshot, before a restart or a power cut — each once, in journal order, then
    /// saves the state. Call it before any reading arrives. Returns the alert records to journal: the
    /// decisions whose records are not among `records` already (those are delivered or on their way).
    pub fn replay(&self, records: &[Record], now_utc: i64) -> Vec<NewRecord> {
        let readings = self.topics.readings();
        let alerts_topic = self.topics.alerts();
        // The journal key of an alert record names the decision (`record`): the same key is the same
        // decision, journaled before the restart.
        let journaled: std::collections::HashSet<&str> = records
            .iter()
            .filter(|r| r.topic == alerts_topic)
            .map(|r| r.reading_id.as_str())
            .collect();
        let (actions, replayed, snapshot) = {
            let mut inner = self.inner();
            let mut actions = Vec::new();
            let mut replayed = 0u64;
            for r in records {
                if r.topic != readings || !inner.book.wants(r.seq) {
                    continue;
                }
                let reading = serde_json::from_slice::<ReadingMessage>(&r.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|msg| {
                        protocol::engine_input::engine_reading(&msg, now_utc)
                            .map(|e| (msg, e))
                            .map_err(|e| e.to_string())
                    });
                match reading {
                    Ok((msg, e)) => {
                        actions.extend(inner.engine.on_reading(&ReadingInput {
                            patient: &msg.patient,
                            reading_id: &msg.id,
                            time_utc: e.time_utc,
                            measurement: &e.measurement,
                            verdict: &e.verdict,
                            symptoms: Symptoms::NONE,
                        }));
                        replayed += 1;
                    }
                    // Not evaluated before either (the gateway wrote it; the engine would not take it).
                    Err(e) => {
                        tracing::debug!(seq = r.seq, error = %e, "edge alerts: a kept reading is not evaluated")
                    }
                }
                inner.book.evaluated(r.seq);
            }
            // Nothing else runs yet: every kept reading is in the state now.
            inner.book.quiet();
            let snapshot = self.snapshot(&mut inner);
            (actions, replayed, snapshot)
        };
        let decisions = actions.len();
        let new: Vec<NewRecord> = self
            .records(actions, now_utc)
            .into_iter()
            .filter(|r| !journaled.contains(r.reading_id.as_str()))
            .collect();
        if replayed > 0 {
            tracing::info!(
                readings = replayed,
                decisions,
                not_journaled_before = new.len(),
                "edge alerts: replayed the readings accepted after the last snapshot"
            );
        }
        self.save(snapshot);
        self.changed.notify_one();
        new
    }

    /// A numbered snapshot of the engine's state, taken while the engine is locked.
    fn snapshot(&self, inner: &mut Inner) -> Option<Taken> {
        let file = self.state_file.as_ref()?;
        let snapshot = Snapshot {
            format: STATE_FORMAT,
            book: inner.book.clone(),
            state: inner.engine.state(),
        };
        *file.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        match serde_json::to_vec(&snapshot) {
            Ok(bytes) => {
                inner.book.dirty = false;
                Some((
                    file.taken.fetch_add(1, Ordering::Relaxed) + 1,
                    bytes,
                    inner.book.through,
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise the edge alert state");
                None
            }
        }
    }

    /// Whether a snapshot is due: something the journal cannot replay was decided (`decided`), or
    /// readings were evaluated and the last snapshot is [`SNAPSHOT_EVERY`] old.
    fn due(&self, inner: &Inner, decided: bool) -> bool {
        let Some(file) = &self.state_file else {
            return false;
        };
        decided
            || (inner.book.dirty
                && file
                    .last
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    >= file.every)
    }

    /// Writes a snapshot unless a newer one is on disk already; then the journal may let go of the
    /// readings it includes.
    fn save(&self, snapshot: Option<Taken>) {
        let (Some(file), Some((n, bytes, through))) = (&self.state_file, snapshot) else {
            return;
        };
        let mut written = file.written.lock().unwrap_or_else(|p| p.into_inner());
        if n <= *written {
            return;
        }
        match crate::state_file::replace(&file.path, &bytes) {
            Ok(()) => {
                *written = n;
                // Only a `through` known to be on disk lets the journal delete what a replay needs.
                if through.is_some() {
                    file.keep.set(through);
                }
            }
            Err(e) => {
                tracing::warn!(path = %file.path.display(), error = %e, "cannot save the edge alert state; a restart may open an ongoing episode again at the edge")
            }
        }
    }

    /// Open episodes by severity name (`"CRITICAL"`, …) and the alerts waiting for confirmation: counts
    /// only, no patient data (`gateway status`).
    pub fn open_counts(&self) -> (std::collections::BTreeMap<&'static str, u64>, u64) {
        let inner = self.inner();
        let engine = &inner.engine;
        let mut by_severity = std::collections::BTreeMap::new();
        for alert in engine.state().episodes() {
            *by_severity.entry(alert.severity.name()).or_insert(0) += 1;
        }
        (by_severity, engine.state().pending_confirmations() as u64)
    }

    /// Saves the state if anything changed since the last snapshot (at shutdown, after the sessions
    /// ended).
    pub fn flush(&self) {
        let snapshot = {
            let mut inner = self.inner();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                inner.book.quiet();
            }
            if !inner.book.dirty {
                return;
            }
            self.snapshot(&mut inner)
        };
        self.save(snapshot);
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The engine's state is plain data updated per call; a panic mid-call would be a bug in the
        // engine, and alerting on with the state as it is serves the patient better than stopping.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates every patient's settings against the rules, then applies them all — or none: the first
    /// invalid override is returned and nothing changes.
    ///
    /// # Errors
    /// The first [`OverrideError`] (it names the rule and says why).
    pub fn set_patients(&self, patients: &[PatientSettings]) -> Result<(), Box<OverrideError>> {
        let mut inner = self.inner();
        let engine = &mut inner.engine;
        // Validate on a scratch engine first: `set_patient` applies one at a time.
        let mut scratch = Engine::new(engine.rules().clone(), Vec::new()).map_err(Box::new)?;
        for p in patients {
            scratch.set_patient(p.clone()).map_err(Box::new)?;
        }
        for p in patients {
            engine.set_patient(p.clone()).map_err(Box::new)?;
        }
        Ok(())
    }

    /// Evaluates a reading the journal accepted as seq `seq` (its `ticket` taken before it was handed
    /// to the journal); returns the alert records to journal.
    pub fn on_reading(
        &self,
        input: &ReadingInput<'_>,
        seq: u64,
        ticket: Ticket,
        now_utc: i64,
    ) -> Vec<NewRecord> {
        self.on_reading_with(input, seq, ticket, now_utc, |_| {})
    }

    /// [`EdgeAlerts::on_reading`], showing the engine's decisions to `inspect` first (the kiosk's patient
    /// page puts them in plain words).
    pub fn on_reading_with(
        &self,
        input: &ReadingInput<'_>,
        seq: u64,
        ticket: Ticket,
        now_utc: i64,
        inspect: impl FnOnce(&[AlertAction]),
    ) -> Vec<NewRecord> {
        let (actions, snapshot) = {
            let mut inner = self.inner();
            let actions = inner.engine.on_reading(input);
            inner.book.evaluated(seq);
            drop(ticket);
            // Under the engine lock: a reading evaluated after this check waits for the lock, so it
            // is not in the snapshot and its seq is above the highest seen.
            if self.in_flight.load(Ordering::Acquire) == 0 {
                inner.book.quiet();
            }
            // What the reading decided is not a reason to save: a replay decides it again from the
            // journaled reading (module docs).
            let snapshot = if self.due(&inner, false) {
                self.snapshot(&mut inner)
            } else {
                None
            };
            (actions, snapshot)
        };
        self.save(snapshot);
        inspect(&actions);
        // The reading may have opened a pending confirmation or an alert to acknowledge.
        self.changed.notify_one();
        self.records(actions, now_utc)
    }

    /// Advances the engine's clock (confirmation timeouts, escalation, window rules); returns the alert
    /// records to journal.
    pub fn on_tick(&self, now_utc: i64) -> Vec<NewRecord> {
        self.advance(now_utc, Engine::on_tick)
    }

    /// Runs the deadlines due at `now_utc` (confirmation timeouts, unacknowledged escalation) without
    /// the window rules; returns the alert records to journal.
    pub fn on_deadlines(&self, now_utc: i64) -> Vec<NewRecord> {
        self.advance(now_utc, Engine::on_deadlines)
    }

    /// The patient reported symptoms (the kiosk's yes/no question, CLINICAL.md §2.3, §4.2: symptoms skip
    /// confirmation): confirms pending alerts whose rule names them, escalates open episodes, fires
    /// `reported` rules. `reading_id` is the reading whose question was answered. Returns the records to
    /// journal: first the report itself (`phg.symptoms/1` on `…/symptoms`, so ingest's authoritative
    /// engine learns of it too), then the edge engine's alert records.
    pub fn on_symptoms(
        &self,
        patient: &str,
        reading_id: &str,
        symptoms: Symptoms,
        now_utc: i64,
    ) -> Vec<NewRecord> {
        let report = self.report(patient, reading_id, symptoms, now_utc);
        let alerts = self.advance(now_utc, |engine, now| {
            engine.on_symptoms(patient, now, symptoms)
        });
        report.into_iter().chain(alerts).collect()
    }

    /// The record carrying a symptom report to the uplink. Its journal key is the report's deterministic
    /// id, so the same answer journaled twice is published once; `None` (logged) when the report cannot
    /// be built, which only a bug upstream causes (the kiosk answers about its own attributed readings):
    /// the edge engine still acts on the symptoms.
    fn report(
        &self,
        patient: &str,
        reading_id: &str,
        symptoms: Symptoms,
        now_utc: i64,
    ) -> Option<NewRecord> {
        let message = match SymptomsMessage::new(
            &self.gateway_id,
            patient,
            reading_id,
            symptoms,
            now_utc,
        ) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot build a symptom report; only the edge engine learns of it");
                return None;
            }
        };
        match serde_json::to_vec(&message) {
            Ok(payload) => Some(NewRecord {
                device: format!("symptoms:{patient}"),
                device_seq: None,
                reading_id: format!("symptoms:{}", message.id),
                topic: self.topics.symptoms(),
                payload,
            }),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise a symptom report");
                None
            }
        }
    }

    /// The engine's next deadline (Unix s), if anything waits for one.
    pub fn next_deadline(&self) -> Option<i64> {
        self.inner().engine.next_deadline()
    }

    /// Sleeps until the engine's next deadline or `window_at`, whichever is first, and says which. A
    /// reading that sets an earlier deadline meanwhile wakes it to sleep for that one instead; a
    /// deadline already past is due at once (a reading downloaded after its confirmation window), but
    /// not before `not_before`: the caller spaces deadline passes (a download of old records sets one
    /// past deadline per episode, and one pass a second handles them together). `now_utc` reads the
    /// wall clock the deadlines are on.
    pub async fn wait_due(
        &self,
        window_at: Instant,
        not_before: Instant,
        now_utc: impl Fn() -> i64,
    ) -> Due {
        loop {
            // Registered before the deadline is read, so a reading in between still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = self.next_deadline().and_then(|d| {
                let wait = u64::try_from(d.saturating_sub(now_utc())).unwrap_or(0);
                Instant::now()
                    .checked_add(std::time::Duration::from_secs(wait))
                    .map(|d| d.max(not_before))
            });
            let (at, due) = match deadline {
                Some(d) if d <= window_at => (d, Due::Deadline),
                _ => (window_at, Due::Window),
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at) => return due,
                _ = &mut changed => {}
            }
        }
    }

    fn advance(
        &self,
        now_utc: i64,
        step: impl FnOnce(&mut Engine, i64) -> Vec<AlertAction>,
    ) -> Vec<NewRecord> {
        let (actions, snapshot) = {
            let mut inner = self.inner();
            let actions = step(&mut inner.engine, now_utc);
            // A tick that decided nothing changed nothing worth a write (at most some pruning); it
            // still saves readings evaluated long enough ago (a gateway whose readings stopped).
            let snapshot = if self.due(&inner, !actions.is_empty()) {
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    inner.book.quiet();
                }
                self.snapshot(&mut inner)
            } else {
                None
            };
            (actions, snapshot)
        };
        self.save(snapshot);
        self.records(actions, now_utc)
    }

    fn records(&self, actions: Vec<AlertAction>, now_utc: i64) -> Vec<NewRecord> {
        actions
            .into_iter()
            .filter_map(|action| self.record(action, now_utc))
            .collect()
    }

    fn record(&self, action: AlertAction, now_utc: i64) -> Option<NewRecord> {
        let alert = action.alert();
        // One record per decision about an alert: the same decision journaled twice is one message.
        let reading_id = format!(
            "alert:{}:{}:{}:{}",
            alert.id,
            action_name(&action),
            alert.severity.name(),
            alert.updated_utc
        );
        let device = format!("alerts:{}", alert.patient);
        let message = match AlertMessage::new(&self.gateway_id, now_utc, action) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot build an alert message");
                return None;
            }
        };
        match serde_json::to_vec(&message) {
            Ok(payload) => Some(NewRecord {
                device,
                device_seq: None,
                reading_id,
                topic: self.topics.alerts(),
                payload,
            }),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise an alert message");
                None
            }
        }
    }
}

fn action_name(action: &AlertAction) -> &'static str {
    match action {
        AlertAction::Open(_) => "open",
        AlertAction::Escalate { .. } => "escalate",
        AlertAction::Confirm { .. } => "confirm",
        AlertAction::Downgrade { .. } => "downgrade",
        AlertAction::Close { .. } => "close",
    }
}

/// The engine state and the book of a state file: format 2, or the bare engine state of format 1.
fn parse_state(bytes: &[u8]) -> Result<(EngineState, Book), String> {
    #[derive(serde::Deserialize)]
    struct Format {
        format: Option<u32>,
    }
    let format = serde_json::from_slice::<Format>(bytes)
        .map_err(|e| e.to_string())?
        .format;
    match format {
        Some(STATE_FORMAT) => {
            let s: Snapshot<EngineState> =
                serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            Ok((s.state, s.book))
        }
        Some(other) => Err(format!(
            "format {other}, this gateway reads formats 1 and {STATE_FORMAT} (written by a newer gateway?)"
        )),
        // Format 1: the engine state alone. Which readings it includes is unknown: none are replayed.
        None => Ok((
            serde_json::from_slice(bytes).map_err(|e| e.to_string())?,
            Book::default(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ieee11073::SFloat;
    use protocol::model::{
        BloodPressureRecord, Glucose, GlucoseRecord, Measurement, Pressure, PressureUnit,
        RecordNumbering,
    };
    use protocol::rules::{Dec, Override, Symptom, Symptoms};
    use protocol::validate::{Reception, validate};
    use serde_json::Value;

    const T0: i64 = 1_718_352_000; // 2024-06-14T08:00:00Z

    fn alerts(patients: Vec<PatientSettings>) -> Result<EdgeAlerts, Box<OverrideError>> {
        let rules = RuleSet::default_rules().expect("the default rules load");
        EdgeAlerts::new(rules, patients, "gw-1", Topics::for_gateway("gw-1"))
    }

    fn cuff(sys: i32, dia: i32) -> Measurement {
        let p = |v| Pressure {
            raw: SFloat::new(v, 0).expect("SFLOAT"),
            unit: PressureUnit::MmHg,
        };
        Measurement::BloodPressure(BloodPressureRecord {
            systolic: p(sys),
            diastolic: p(dia),
            mean_arterial_pressure: p((sys + 2 * dia) / 3),
            timestamp: None,
            pulse_rate: Some(SFloat::new(70, 0).expect("SFLOAT")),
            user_id: None,
            measurement_status: None,
        })
    }

    /// Journal seqs for the readings fed, increasing across engines (as across restarts).
    static SEQ: AtomicU64 = AtomicU64::new(1);

    fn feed(a: &EdgeAlerts, patient: &str, id: &str, t: i64, m: &Measurement) -> Vec<NewRecord> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let verdict = validate(
            m,
            &Reception {
                received_utc: t,
                clock_offset_s: None,
            },
        );
        a.on_reading(
            &ReadingInput {
                patient,
                reading_id: id,
                time_utc: t,
                measurement: m,
                verdict: &verdict,
                symptoms: Symptoms::NONE,
            },
            seq,
            a.ticket(),
            t,
        )
    }

    fn payload(r: &NewRecord) -> Value {
        serde_json::from_slice(&r.payload).expect("alert payload is JSON")
    }

    fn bp_low_relaxed_to(mmhg: i64, waiver: Option<&str>) -> PatientSettings {
        let mut s = PatientSettings::new("p-1");
        s.overrides.push(Override {
            rule_id: "BP_LOW".into(),
            param: Some("sbp".into()),
            mmhg: Some(Dec::new(mmhg, 0)),
            set_by: "dr-x".into(),
            reason: "lives at 88/65".into(),
            waiver: waiver.map(str::to_owned),
            ..Override::default()
        });
        s
    }

    #[test]
    fn a_bp_crisis_becomes_a_journaled_alert_on_the_alerts_topic() {
        let a = alerts(Vec::new()).expect("engine");
        let records = feed(&a, "p-1", "r-1", T0, &cuff(185, 125));
        assert_eq!(records.len(), 1, "one decision about one alert");
        let r = &records[0];
        assert_eq!(r.topic, "phg/v1/gw-1/alerts");
        assert_eq!(r.device, "alerts:p-1");
        let v = payload(r);
        assert_eq!(v["schema"], "phg.alert/1");
        assert_eq!(v["gateway"], "gw-1");
        assert_eq!(v["update"]["action"], "open");
        assert_eq!(v["update"]["patient"], "p-1");
        assert!(
            v["update"]["rule_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("BP_")),
            "{v}"
        );
        assert_eq!(v["update"]["reading_ids"][0], "r-1");
        // The threshold and its guideline source travel with it.
        assert!(
            v["update"]["source"]["cite"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        );
        // The record's dedup key is stable for the same decision.
        assert!(r.reading_id.starts_with("alert:p-1/"), "{}", r.reading_id);
    }

    /// The engine's state survives a restart: a crisis episode opened before it is not opened again by
    /// the next crisis reading after it (a fresh engine would), and the file is private.
    #[test]
    fn an_open_episode_survives_a_restart() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("edge-alerts.json");
        let rules = || RuleSet::default_rules().expect("the default rules load");
        let open = || {
            EdgeAlerts::open(
                rules(),
                Vec::new(),
                "gw-1",
                Topics::for_gateway("gw-1"),
                &file,
            )
            .expect("engine")
        };
        let actions = |records: &[NewRecord]| -> Vec<String> {
            records
                .iter()
                .map(|r| {
                    payload(r)["update"]["action"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned()
                })
                .collect()
        };
        let first = open();
        assert_eq!(
            actions(&feed(&first, "p-1", "r-1", T0, &cuff(185, 125))),
            ["open"]
        );
        // A shutdown saves the state (a decision alone does not: the journal can replay it).
        first.flush();
        drop(first);
        let mode = std::fs::metadata(&file)
            .expect("state file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let after_restart = feed(&open(), "p-1", "r-2", T0 + 600, &cuff(186, 124));
        assert!(
            !actions(&after_restart).contains(&"open".to_owned()),
            "the episode continues: {:?}",
            actions(&after_restart)
        );
        // Without the state, the same reading opens the episode a second time.
        let fresh = alerts(Vec::new()).expect("engine");
        assert_eq!(
            actions(&feed(&fresh, "p-1", "r-2", T0 + 600, &cuff(186, 124))),
            ["open"]
        );

        // A damaged state file: reported, and the engine starts afresh rather than not at all.
        std::fs::write(&file, b"{not json").expect("damage it");
        assert_eq!(
            actions(&feed(&open(), "p-1", "r-3", T0 + 1200, &cuff(185, 125))),
            ["open"]
        );
    }

    /// A reading as the journal holds it (its message on the readings topic), and the engine input the
    /// pipeline evaluated it with.
    fn journaled(seq: u64, patient: &str, t: i64, m: &Measurement) -> Record {
        let rx = Reception {
            received_utc: t,
            clock_offset_s: None,
        };
        let verdict = validate(m, &rx);
        let dref = protocol::wire::DeviceRef {
            id: "cuff-1".into(),
            model: None,
            user_id: None,
        };
        let msg = ReadingMessage::new("gw-1", patient, dref, m, &verdict, &rx)
            .expect("a reading message");
        Record {
            seq,
            device: "cuff-1".into(),
            device_seq: None,
            reading_id: msg.id.clone(),
            topic: Topics::for_gateway("gw-1").readings(),
            payload: serde_json::to_vec(&msg).expect("JSON"),
        }
    }

    /// Evaluates a journaled reading the way the pipeline does once the journal accepted it.
    fn accept(a: &EdgeAlerts, r: &Record, m: &Measurement) -> Vec<NewRecord> {
        let msg: ReadingMessage = serde_json::from_slice(&r.payload).expect("JSON");
        let t = protocol::engine_input::parse_rfc3339_utc(&msg.body.time.received).expect("time");
        let verdict = validate(
            m,
            &Reception {
                received_utc: t,
                clock_offset_s: None,
            },
        );
        a.on_reading(
            &ReadingInput {
                patient: &msg.patient,
                reading_id: &msg.id,
                time_utc: t,
                measurement: m,
                verdict: &verdict,
                symptoms: Symptoms::NONE,
            },
            r.seq,
            a.ticket(),
            t,
        )
    }

    fn state(a: &EdgeAlerts) -> EngineState {
        a.inner().engine.state().clone()
    }

    /// Issue 14 item 6: the state is not written per reading, not even for one that decided something;
    /// after a power cut the readings accepted after the last snapshot come back from the journal and
    /// are evaluated again exactly once — the engine ends where it would have been without the power
    /// cut. A decision whose alert record the journal holds is not journaled again; a crisis reading
    /// accepted just before the power went (never evaluated) raises its alert at the restart.
    #[test]
    fn readings_after_the_snapshot_are_replayed_once_after_a_power_cut() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("edge-alerts.json");
        let open = || {
            EdgeAlerts::open(
                RuleSet::default_rules().expect("the default rules load"),
                Vec::new(),
                "gw-1",
                Topics::for_gateway("gw-1"),
                &file,
            )
            .expect("engine")
        };
        let mut readings = Vec::new();
        let mut seq = 100;
        let mut next = |patient: &str, t: i64, m: &Measurement| {
            seq += 1;
            readings.push((journaled(seq, patient, t, m), *m));
        };
        // p-9's crisis: decided, its alert record journaled after it.
        next("p-9", T0, &cuff(185, 125));
        // p-1's ordinary readings.
        for i in 0..5 {
            next("p-1", T0 + 60 + i * 60, &cuff(120 + i as i32, 78));
        }
        // p-1's crisis: accepted by the journal; the power goes before it is evaluated.
        next("p-1", T0 + 400, &cuff(190, 126));
        let (crisis, earlier) = readings.split_last().expect("readings");

        let before = open();
        let (first, ordinary) = earlier.split_first().expect("readings");
        let opened = accept(&before, &first.0, &first.1);
        assert_eq!(opened.len(), 1, "p-9's episode opened");
        // The journal as the pipeline leaves it: p-9's alert record right after its reading.
        let mut journal = vec![first.0.clone()];
        journal.push(Record {
            seq: 1000,
            device: opened[0].device.clone(),
            device_seq: None,
            reading_id: opened[0].reading_id.clone(),
            topic: opened[0].topic.clone(),
            payload: opened[0].payload.clone(),
        });
        for (r, m) in ordinary {
            assert!(accept(&before, r, m).is_empty());
            journal.push(r.clone());
        }
        journal.push(crisis.0.clone());
        assert!(
            !file.exists(),
            "nothing written: neither the decision nor the ordinary readings are a reason to save"
        );
        // Where the engine would be without the power cut.
        let reference = alerts(Vec::new()).expect("engine");
        for (r, m) in &readings {
            accept(&reference, r, m);
        }
        drop(before); // the power cut: no flush

        let after = open();
        let raised = after.replay(&journal, T0 + 500);
        let raised: Vec<Value> = raised.iter().map(payload).collect();
        assert_eq!(raised.len(), 1, "p-9's decision not again: {raised:?}");
        assert_eq!(raised[0]["update"]["patient"], "p-1");
        assert_eq!(raised[0]["update"]["action"], "open");
        assert_eq!(raised[0]["update"]["reading_ids"][0], crisis.0.reading_id);
        assert_eq!(
            state(&after),
            state(&reference),
            "each reading once, none twice"
        );

        // Without its alert record (the power went between the two), p-9's decision is journaled too.
        std::fs::remove_file(&file).expect("state file");
        let without: Vec<Record> = readings.iter().map(|(r, _)| r.clone()).collect();
        let patients: Vec<Value> = open()
            .replay(&without, T0 + 500)
            .iter()
            .map(|r| payload(r)["update"]["patient"].clone())
            .collect();
        assert_eq!(patients, ["p-9", "p-1"]);

        // The replay was saved: a second restart replays nothing.
        let again = open();
        assert!(again.replay(&journal, T0 + 600).is_empty());
        assert_eq!(state(&again), state(&reference));
    }

    /// Issue 14 item 8: a state file written before issue 14 (the bare engine state) is read after an
    /// upgrade: the open episode continues.
    #[test]
    fn a_version_1_state_file_is_read_after_an_upgrade() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("edge-alerts.json");
        let old = alerts(Vec::new()).expect("engine");
        assert_eq!(feed(&old, "p-1", "r-1", T0, &cuff(185, 125)).len(), 1);
        std::fs::write(&file, serde_json::to_vec(&state(&old)).expect("JSON")).expect("write");
        let upgraded = EdgeAlerts::open(
            RuleSet::default_rules().expect("the default rules load"),
            Vec::new(),
            "gw-1",
            Topics::for_gateway("gw-1"),
            &file,
        )
        .expect("engine");
        assert_eq!(state(&upgraded), state(&old));
        let next = feed(&upgraded, "p-1", "r-2", T0 + 600, &cuff(186, 124));
        assert!(
            next.iter()
                .all(|r| payload(r)["update"]["action"] != "open"),
            "the episode continues"
        );
    }

    /// Issue 11 item 13: a crisis reading with no repeat is raised when its 15-minute confirmation
    /// window ends, not at the next window tick (an hour away here). The ticker sleeps before the
    /// reading arrives, so this also shows the reading wakes it to sleep for the new deadline.
    #[tokio::test]
    async fn a_pending_confirmation_is_raised_at_its_deadline_not_at_the_window_tick() {
        use std::sync::Arc;
        use std::time::Duration;
        let now = crate::sources::collector::now_utc;
        let a = Arc::new(alerts(Vec::new()).expect("engine"));
        let window_at = Instant::now() + Duration::from_secs(3600);
        let waiter = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.wait_due(window_at, Instant::now(), now).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Measured 15 min ago less a second: its window ends in a second, its timeout is due a
        // second later.
        let measured = now() - 899;
        let opened = feed(&a, "p-1", "r-1", measured, &cuff(185, 125));
        assert_eq!(payload(&opened[0])["update"]["status"], "pending");
        assert_eq!(a.next_deadline(), Some(measured + 901));
        let due = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("woken within seconds of the deadline, not at the window tick")
            .expect("waiter");
        assert_eq!(due, Due::Deadline);
        assert!(now() >= measured + 901, "not before the deadline");
        let raised = a.on_deadlines(now());
        assert_eq!(raised.len(), 1);
        let v = payload(&raised[0]);
        assert_eq!(v["update"]["action"], "confirm", "{v}");
        assert_eq!(v["update"]["by"], "timeout", "{v}");
        // With nothing waiting, the window tick is what comes next.
        assert_eq!(a.next_deadline().map(|d| d > now() + 3600), Some(true));
    }

    /// A glucose reading of `mg_dl` mg/dL (a GLS record, sequence `seq`).
    fn meter(seq: u16, mg_dl: i32) -> Measurement {
        Measurement::Glucose(GlucoseRecord {
            sequence_number: seq,
            numbering: RecordNumbering::Gls,
            base_time: protocol::gatt::time::DateTime::default(),
            time_offset_min: None,
            concentration: Some(Glucose::from_wire(
                SFloat::new(mg_dl, -5).expect("SFLOAT"),
                false,
            )),
            sample_type: Some(1),
            sample_location: Some(1),
            sensor_status: None,
            context: None,
        })
    }

    /// The `(action, rule_id, severity, status)` of each alert record, in order.
    fn decisions(records: &[NewRecord]) -> Vec<(String, String, String, String)> {
        records
            .iter()
            .filter(|r| r.topic.ends_with("/alerts"))
            .map(|r| {
                let v = payload(r);
                let u = &v["update"];
                // `open` carries the alert inline; the other actions under `alert`.
                let a = if u["action"] == "open" {
                    u
                } else {
                    &u["alert"]
                };
                let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
                (
                    s(&u["action"]),
                    s(&a["rule_id"]),
                    s(&a["severity"]),
                    s(&a["status"]),
                )
            })
            .collect()
    }

    const READING: &str = "94271e75-c46f-5b34-8576-702696c5b216";

    /// Issue 12 item 5: "yes" to the crisis question raises the pending crisis to CRITICAL at once (no
    /// wait for a repeat), and the report itself is the first record, on its own topic, for ingest.
    #[test]
    fn crisis_symptoms_make_a_pending_crisis_critical_at_once_and_travel_to_ingest() {
        let a = alerts(Vec::new()).expect("engine");
        let opened = feed(&a, "p-1", READING, T0, &cuff(185, 125));
        assert_eq!(
            decisions(&opened),
            [(
                "open".into(),
                "BP_CRISIS".into(),
                "URGENT".into(),
                "pending".into()
            )]
        );
        let records = a.on_symptoms(
            "p-1",
            READING,
            Symptoms::of(&[Symptom::CrisisSymptoms]),
            T0 + 40,
        );
        assert_eq!(records.len(), 2, "the report, then the decision");
        let report = &records[0];
        assert_eq!(report.topic, "phg/v1/gw-1/symptoms");
        let v = payload(report);
        assert_eq!(v["schema"], "phg.symptoms/1");
        assert_eq!(v["gateway"], "gw-1");
        assert_eq!(v["patient"], "p-1");
        assert_eq!(v["reading_id"], READING);
        assert_eq!(v["symptoms"], serde_json::json!(["crisis_symptoms"]));
        assert_eq!(v["answered"], "2024-06-14T08:00:40Z");
        let id = v["id"].as_str().expect("an id");
        assert_eq!(report.reading_id, format!("symptoms:{id}"));
        assert_eq!(
            decisions(&records),
            [(
                "confirm".into(),
                "BP_CRISIS".into(),
                "CRITICAL".into(),
                "active".into()
            )]
        );
        assert_eq!(payload(&records[1])["update"]["by"], "symptoms");
        // Nothing waits for the confirmation window any more.
        assert!(a.on_deadlines(T0 + 901).is_empty());
    }

    /// "Yes" to the low-glucose question is a severe (Level 3) hypoglycaemia: GLU_HYPO_L3, CRITICAL.
    #[test]
    fn severe_hypoglycaemia_symptoms_raise_glu_hypo_l3() {
        let a = alerts(Vec::new()).expect("engine");
        let low = feed(&a, "p-2", READING, T0, &meter(7, 60));
        assert!(
            decisions(&low).iter().all(|d| d.2 != "CRITICAL"),
            "60 mg/dL alone is not critical: {:?}",
            decisions(&low)
        );
        let records = a.on_symptoms(
            "p-2",
            READING,
            Symptoms::of(&[Symptom::SevereHypoglycaemia]),
            T0 + 30,
        );
        assert_eq!(payload(&records[0])["symptoms"][0], "severe_hypoglycaemia");
        let d = decisions(&records);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].1.as_str(), d[0].2.as_str()),
            ("GLU_HYPO_L3", "CRITICAL")
        );
    }

    /// "No" is reported too (the CRM sees the question was answered) and raises nothing.
    #[test]
    fn no_symptoms_is_reported_and_raises_nothing() {
        let a = alerts(Vec::new()).expect("engine");
        feed(&a, "p-3", READING, T0, &cuff(185, 125));
        let records = a.on_symptoms("p-3", READING, Symptoms::NONE, T0 + 40);
        assert_eq!(records.len(), 1);
        assert_eq!(payload(&records[0])["symptoms"], serde_json::json!([]));
        // The same answer again is the same report (one message after the journal's deduplication).
        let again = a.on_symptoms("p-3", READING, Symptoms::NONE, T0 + 50);
        assert_eq!(again[0].reading_id, records[0].reading_id);
    }

    #[test]
    fn a_normal_reading_raises_nothing() {
        let a = alerts(Vec::new()).expect("engine");
        assert!(feed(&a, "p-1", "r-1", T0, &cuff(118, 76)).is_empty());
    }

    #[test]
    fn patient_settings_apply_whole_or_not_at_all() {
        let a = alerts(Vec::new()).expect("engine");
        // Default: 84/60 is below the BP_LOW threshold (< 90 mmHg).
        assert!(!feed(&a, "p-1", "r-1", T0, &cuff(84, 60)).is_empty());

        // A relaxed advisory threshold applies: 88 is no longer low for this patient.
        let b = alerts(Vec::new()).expect("engine");
        b.set_patients(&[bp_low_relaxed_to(85, None)])
            .expect("relaxing an advisory threshold is allowed");
        assert!(feed(&b, "p-1", "r-1", T0, &cuff(88, 65)).is_empty());

        // A batch with one invalid settings (a critical floor relaxed without a waiver) changes nothing.
        let mut bad = PatientSettings::new("p-2");
        bad.overrides.push(Override {
            rule_id: "GLU_HYPO_L2".into(),
            param: Some("value".into()),
            mg_dl: Some(Dec::new(45, 0)),
            set_by: "dr-x".into(),
            reason: "r".into(),
            ..Override::default()
        });
        let err = b
            .set_patients(&[bp_low_relaxed_to(70, None), bad])
            .expect_err("a critical floor needs a waiver");
        assert!(err.to_string().contains("waiver"), "{err}");
        // p-1 keeps the 85 threshold (not 70): 84 is still low.
        assert!(!feed(&b, "p-1", "r-2", T0 + 86_400, &cuff(84, 60)).is_empty());
    }
}
