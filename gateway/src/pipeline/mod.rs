//! The pipeline: decode → validate → attribute → reading id → journal.
//!
//! One [`SessionSink`] per device session implements the collectors' [`RecordSink`]. It decodes each value
//! with the `protocol` codecs, joins glucose contexts to their measurements by sequence number, validates
//! (CLINICAL.md §3), attributes the reading to a pseudonymous patient through the [`Bindings`], and hands the
//! message to the journal writer ([`writer`]). Nothing is dropped silently:
//!
//! | what | where it goes |
//! |---|---|
//! | a valid, low-quality or censored reading of a bound device | `…/readings` |
//! | a rejected reading, a control-solution test | an event on `…/events` (journaled) |
//! | a reading of a device (or cuff user) bound to no patient | an `unattributed` event holding the whole reading (journaled) |
//! | a value that does not decode | a `decode_failed` event (journaled) |
//!
//! Each record carries the device's record number as `device_seq`, which is the journal's per-device
//! cursor: the collector's "last accepted" is whatever the journal has fsynced, so it cannot run ahead of
//! acceptance (DESIGN.md promise 4). For a GLS meter that is the sequence number. A cuff, or a meter that
//! numbers newest-first, has no lasting record number: its cursor counts the readings accepted and carries
//! the last one's device time ([`crate::sources::collector::marked_cursor`]), by which the collector
//! finds it in the next transfer and hands over only what came after it — so a cuff that dumps its whole
//! memory on every subscribe doubles nothing, and a clock set back loses nothing.

pub mod handoff;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::gatt::Codec;
use protocol::gatt::bp::BloodPressureMeasurement;
use protocol::gatt::glucose::{GlucoseContext, GlucoseMeasurement};
use protocol::model::{
    BloodPressureRecord, ContextJoiner, GlucoseContextInfo, GlucoseRecord, Measurement,
    RecordNumbering,
};
use protocol::validate::{Reception, validate};
use protocol::wire::{self, Event, EventMessage, ReadingMessage, Topics};
use tokio::sync::oneshot;

use crate::journal::{Journal, NewRecord};
use crate::sources::collector::{
    RecordSink, SessionInfo, SinkError, bp_cursor_key, marked_count, marked_cursor,
};
use crate::sources::uuid;
use writer::{Outcome, Refusal, WriterHandle};

/// Device (and cuff user) → pseudonymous patient id. Shared by every session and replaced whole when
/// the CRM sends a new configuration (a reading is attributed with one version or the other, never a mix).
///
/// Once a configuration from the CRM has been applied, the CRM is the system of record for the devices
/// it binds ([`Bindings::from_crm`]): a local binding (`gateway pair`) then only fills in for devices the
/// CRM does not name.
#[derive(Debug, Default)]
pub struct Bindings {
    map: std::sync::RwLock<HashMap<(String, Option<u8>), String>>,
    from_crm: AtomicBool,
    /// The clinic kiosk, whose shared devices are attributed by check-in session instead of a binding.
    kiosk: std::sync::RwLock<Option<Arc<crate::kiosk::Kiosk>>>,
}

impl Clone for Bindings {
    /// A snapshot: later changes to either are not seen by the other.
    fn clone(&self) -> Self {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner()).clone();
        Bindings {
            map: std::sync::RwLock::new(map),
            from_crm: AtomicBool::new(self.from_crm()),
            kiosk: std::sync::RwLock::new(self.kiosk()),
        }
    }
}

impl Bindings {
    /// Binds `device` (for every user, or one BLS `user_id`) to `patient`.
    pub fn bind(&mut self, device: &str, user_id: Option<u8>, patient: &str) {
        self.map
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .insert((device.to_owned(), user_id), patient.to_owned());
    }

    /// The patient a reading belongs to: the binding for its user if there is one, else for the device.
    pub fn patient(&self, device: &str, user_id: Option<u8>) -> Option<String> {
        // A plain map, consistent after every statement: a poisoned lock still holds valid data.
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        user_id
            .and_then(|u| map.get(&(device.to_owned(), Some(u))))
            .or_else(|| map.get(&(device.to_owned(), None)))
            .cloned()
    }

    /// Replaces every binding with those of `other` (a new configuration from the CRM).
    pub fn replace_with(&self, other: Bindings) {
        let new = other.map.into_inner().unwrap_or_else(|p| p.into_inner());
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = new;
        self.from_crm.store(true, Ordering::Release);
    }

    /// Makes `kiosk` attribute its devices' readings (`None`: no kiosk, or shutdown letting go of it).
    pub fn set_kiosk(&self, kiosk: Option<Arc<crate::kiosk::Kiosk>>) {
        *self.kiosk.write().unwrap_or_else(|p| p.into_inner()) = kiosk;
    }

    /// The kiosk, if there is one.
    pub fn kiosk(&self) -> Option<Arc<crate::kiosk::Kiosk>> {
        self.kiosk.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The kiosk if `device` is one of its shared devices.
    pub fn kiosk_of(&self, device: &str) -> Option<Arc<crate::kiosk::Kiosk>> {
        self.kiosk().filter(|k| k.has_device(device))
    }

    /// Whether these are the CRM's bindings (a configuration from the CRM has been applied).
    pub fn from_crm(&self) -> bool {
        self.from_crm.load(Ordering::Acquire)
    }

    /// Whether `device` has any binding (for the device or for one of its users).
    pub fn names_device(&self, device: &str) -> bool {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .any(|(d, _)| d == device)
    }

    /// How many bindings there are.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pipeline counters (also exported to Prometheus by the telemetry module).
#[derive(Debug, Default)]
pub struct Counters {
    /// Patient readings accepted into the journal.
    pub accepted: AtomicU64,
    /// Readings rejected or excluded (control solution), journaled as events.
    pub rejected: AtomicU64,
    /// Readings of unbound devices, journaled as events.
    pub unattributed: AtomicU64,
    /// Values that did not decode.
    pub decode_failed: AtomicU64,
    /// Records the journal refused (full); the devices keep them.
    pub refused: AtomicU64,
    /// Edge alert decisions journaled for `…/alerts`.
    pub alerts: AtomicU64,
}

/// What every session of a gateway shares.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The gateway id (on every message).
    pub gateway_id: String,
    /// The topics.
    pub topics: Topics,
    /// Device bindings.
    pub bindings: Arc<Bindings>,
    /// The journal (read for cursors; written only through `writer`).
    pub journal: Arc<Mutex<Journal>>,
    /// The journal writer.
    pub writer: WriterHandle,
    /// Counters.
    pub counters: Arc<Counters>,
    /// The edge alert engine; `None`: alerts off.
    pub alerts: Option<Arc<crate::alerts::EdgeAlerts>>,
}

impl Pipeline {
    /// Journals a `journal_full` event (into the journal's notice reserve, through the writer; see
    /// [`writer::WriterHandle::submit_notice`]): the download from `device` stopped and the device keeps
    /// its records. One event per device and minute (its id), so a stuck journal does not flood the CRM.
    pub async fn journal_full_notice(&self, device: &str, now_utc: i64) {
        let event = {
            let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            Event::JournalFull {
                depth: j.depth(),
                max: j.config().max_records,
                device: Some(device.to_owned()),
            }
        };
        let payload = match event_json(&self.gateway_id, now_utc, event) {
            Ok(p) => p,
            Err(e) => return tracing::error!(error = %e, "cannot build the journal_full event"),
        };
        let notice = NewRecord {
            device: device.to_owned(),
            device_seq: None,
            reading_id: format!("journal-full:{device}:{}", now_utc.div_euclid(60)),
            topic: self.topics.events(),
            payload,
        };
        if let Err(e) = self.writer.submit_notice(notice).await {
            tracing::warn!(error = %e, device, "journal_full event not journaled");
        }
    }

    /// A sink for one device session.
    pub fn session(&self) -> SessionSink {
        SessionSink {
            pipeline: self.clone(),
            joiner: ContextJoiner::new(),
            staged: Vec::new(),
            in_flight: Vec::new(),
            alerts_due: Vec::new(),
            refused: Arc::new(AtomicBool::new(false)),
            marked_counts: HashMap::new(),
            detached: false,
        }
    }
}

/// The journal cursor key of a reading: the device, and for a multi-user cuff the user too (each user's
/// readings are a separate series in the cuff's memory).
pub fn cursor_key(device: &str, m: &Measurement) -> String {
    match m {
        Measurement::BloodPressure(BloodPressureRecord { user_id, .. }) => {
            bp_cursor_key(device, *user_id)
        }
        Measurement::Glucose(_) => device.to_owned(),
    }
}

/// The pipeline side of one device session.
#[derive(Debug)]
pub struct SessionSink {
    pipeline: Pipeline,
    joiner: ContextJoiner,
    /// Records not yet handed to the writer: a download's records go over together, one commit for up
    /// to [`writer::MAX_BATCH`] (issue 14 item 6: a record committed alone costs an fdatasync and writes
    /// the journal's tail page again — on an SD card, 4 KiB for a reading of 700 bytes). Handed over
    /// when the batch is full, at a live reading, at the end of the transfer, or when the session ends
    /// without one (`Drop`). Nothing is lost by the wait: the device keeps what the journal has not
    /// accepted (the cursor comes from the journal), and a reading is only ever "accepted" once fsynced.
    staged: Vec<(Kind, NewRecord, Option<Box<ToEvaluate>>)>,
    /// Boxed: a session can have thousands in flight, most without anything to evaluate.
    in_flight: Vec<(Kind, oneshot::Receiver<Outcome>, Option<Box<ToEvaluate>>)>,
    /// Alert records decided for accepted readings, not yet handed to the writer.
    alerts_due: Vec<NewRecord>,
    refused: Arc<AtomicBool>,
    /// Per cursor key without lasting record numbers, the records handed over so far, counting from the
    /// journal cursor ([`crate::sources::collector::marked_cursor`]); read from the journal at the first.
    marked_counts: HashMap<String, u64>,
    /// The remainder of an ended session, settled in the background (see `Drop`): never detached again.
    detached: bool,
}

/// What the alert engine needs of a reading, kept until the reading is accepted.
#[derive(Debug)]
struct ToEvaluate {
    patient: String,
    reading_id: String,
    time_utc: i64,
    measurement: Measurement,
    verdict: protocol::validate::Verdict,
    /// A kiosk reading: the kiosk, its session, and the reading as the page shows it.
    kiosk: Option<(Arc<crate::kiosk::Kiosk>, u64, Box<wire::ReadingBody>)>,
    /// Taken before the reading goes to the journal when edge alerts run: their snapshot waits for it.
    ticket: Option<crate::alerts::Ticket>,
}

/// What a journaled record is, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reading,
    Rejected,
    Unattributed,
    DecodeFailed,
    Alert,
}

impl SessionSink {
    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        // Short, await-free critical sections only (a cursor read); see writer.rs for the poison rationale.
        self.pipeline
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Stages a record; `now`: hand what is staged to the writer at once (a live reading).
    async fn submit(
        &mut self,
        kind: Kind,
        record: NewRecord,
        evaluate: Option<Box<ToEvaluate>>,
        now: bool,
    ) -> Result<(), SinkError> {
        if self.refused.load(Ordering::Acquire) {
            return Err(SinkError::Full);
        }
        self.staged.push((kind, record, evaluate));
        if now || self.staged.len() >= writer::MAX_BATCH {
            self.hand_over().await?;
            // Collect outcomes already decided, so a full journal stops the download promptly.
            self.settle(false).await?;
        }
        Ok(())
    }

    /// Hands the staged records, and the alert records decided since the last hand-over (about readings
    /// already accepted: behind them in the journal), to the writer as one commit.
    async fn hand_over(&mut self) -> Result<(), SinkError> {
        self.staged.extend(
            std::mem::take(&mut self.alerts_due)
                .into_iter()
                .map(|record| (Kind::Alert, record, None)),
        );
        if self.staged.is_empty() {
            return Ok(());
        }
        if self.refused.load(Ordering::Acquire) {
            self.staged.clear();
            return Err(SinkError::Full);
        }
        // At most two batches in flight per session: the writer's queue bounds requests, not records,
        // and a download must still wait for the disk (backpressure reaches the device).
        if self.in_flight.len() >= writer::MAX_BATCH {
            self.settle(true).await?;
        }
        let (records, rest): (Vec<NewRecord>, Vec<_>) = std::mem::take(&mut self.staged)
            .into_iter()
            .map(|(kind, record, evaluate)| (record, (kind, evaluate)))
            .unzip();
        let receivers = self
            .pipeline
            .writer
            .submit_batch(records, self.refused.clone())
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))?;
        self.in_flight.extend(
            rest.into_iter()
                .zip(receivers)
                .map(|((kind, evaluate), rx)| (kind, rx, evaluate)),
        );
        Ok(())
    }

    /// Hands over what is staged and waits for every outcome; then the same for the edge alerts the
    /// accepted readings raised.
    ///
    /// Every step runs whatever an earlier one returned: a refused record must not keep the readings
    /// accepted before it from being evaluated. The first error is returned.
    async fn finish(&mut self) -> Result<(), SinkError> {
        let readings = self.hand_over().await;
        let accepted = self.settle(true).await;
        let alerts = self.hand_over().await;
        let decided = self.settle(true).await;
        readings.and(accepted).and(alerts).and(decided)
    }

    /// Evaluates an accepted reading at the edge (DESIGN.md "Alerts": after acceptance, so a reading the
    /// journal refused — which the device still has — is not evaluated twice).
    fn evaluate(&mut self, mut e: Box<ToEvaluate>, seq: u64) {
        let (Some(alerts), Some(ticket)) = (&self.pipeline.alerts, e.ticket.take()) else {
            if let Some((kiosk, session, body)) = &e.kiosk {
                kiosk.result(*session, &e.reading_id, body, None);
            }
            return;
        };
        let e = *e;
        let input = protocol::rules::ReadingInput {
            patient: &e.patient,
            reading_id: &e.reading_id,
            time_utc: e.time_utc,
            measurement: &e.measurement,
            verdict: &e.verdict,
            symptoms: protocol::rules::Symptoms::NONE,
        };
        let records = alerts.on_reading_with(
            &input,
            seq,
            ticket,
            crate::sources::collector::now_utc(),
            |actions| {
                // The kiosk's patient page shows the engine's decision on this reading.
                if let Some((kiosk, session, body)) = &e.kiosk {
                    kiosk.result(*session, &e.reading_id, body, Some(actions));
                }
            },
        );
        if !records.is_empty() {
            // Patient ids stay out of INFO lines (issue 11 item 9): the count here, the id at DEBUG.
            tracing::info!(alerts = records.len(), "edge alert decisions");
            tracing::debug!(patient = %e.patient, alerts = records.len(), "edge alert decisions for a patient");
        }
        self.alerts_due.extend(records);
    }

    /// Collects the outcomes of submitted records: all of them (`wait`), or those already known.
    async fn settle(&mut self, wait: bool) -> Result<(), SinkError> {
        let mut result = Ok(());
        let mut still = Vec::new();
        let in_flight = std::mem::take(&mut self.in_flight);
        for (kind, mut rx, evaluate) in in_flight {
            // The writer answers a session's records in the order they were submitted: once one is
            // undecided, so are those after it (not polling them keeps a 300-record download linear).
            if !still.is_empty() {
                still.push((kind, rx, evaluate));
                continue;
            }
            let outcome = if wait {
                rx.await
                    .unwrap_or(Err(Refusal::Failed("journal writer stopped".into())))
            } else {
                match rx.try_recv() {
                    Ok(o) => o,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        still.push((kind, rx, evaluate));
                        continue;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => {
                        Err(Refusal::Failed("journal writer stopped".into()))
                    }
                }
            };
            let c = &self.pipeline.counters;
            match outcome {
                Ok(seq) => {
                    let counter = match kind {
                        Kind::Reading => &c.accepted,
                        Kind::Rejected => &c.rejected,
                        Kind::Unattributed => &c.unattributed,
                        Kind::DecodeFailed => &c.decode_failed,
                        Kind::Alert => &c.alerts,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(e) = evaluate {
                        self.evaluate(e, seq);
                    }
                }
                Err(Refusal::Full) => {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    result = Err(SinkError::Full);
                }
                Err(Refusal::Failed(e)) => {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    if result.is_ok() {
                        result = Err(SinkError::Unavailable(e));
                    }
                }
            }
        }
        self.in_flight.extend(still);
        result
    }

    /// [`RecordSink::value`] and [`RecordSink::live_value`]: `live` is whether it was indicated as it
    /// was measured.
    async fn take_value(
        &mut self,
        session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
        live: bool,
    ) -> Result<(), SinkError> {
        let device = &session.device.id;
        let decoded: Result<Vec<Measurement>, protocol::Error> = match uuid {
            uuid::GLUCOSE_MEASUREMENT => GlucoseMeasurement::parse(bytes).map(|g| {
                let (previous, now) = self
                    .joiner
                    .measurement(GlucoseRecord::from_gatt(&g), g.context_follows);
                previous
                    .into_iter()
                    .chain(now)
                    .map(Measurement::Glucose)
                    .collect()
            }),
            uuid::GLUCOSE_CONTEXT => GlucoseContext::parse(bytes).map(|c| {
                match self
                    .joiner
                    .context(c.sequence_number, GlucoseContextInfo::from_gatt(&c))
                {
                    Ok(joined) => vec![Measurement::Glucose(joined)],
                    Err(e) => {
                        // GLP: an out-of-sequence context has no measurement to join; the measurement it
                        // belonged to (if any) was already accepted without it.
                        tracing::warn!(device = %device, ?e, "context without its measurement");
                        Vec::new()
                    }
                }
            }),
            uuid::BP_MEASUREMENT => BloodPressureMeasurement::parse(bytes).map(|b| {
                vec![Measurement::BloodPressure(BloodPressureRecord::from_gatt(
                    &b,
                ))]
            }),
            _ => Ok(Vec::new()),
        };
        match decoded {
            Ok(ms) => {
                for m in ms {
                    self.measurement(session, m, received_utc, live).await?;
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(device = %device, characteristic = format_args!("{uuid:04X}"), error = %e, "value did not decode");
                let gateway = self.pipeline.gateway_id.clone();
                let payload = event_json(
                    &gateway,
                    received_utc,
                    Event::decode_failed(device, uuid, bytes, &e),
                )?;
                // The event's id is derived from the bytes so that a re-sent bad value is one event.
                let reading_id =
                    format!("decode-failed:{device}:{uuid:04X}:{}", wire::to_hex(bytes));
                let record = NewRecord {
                    device: device.clone(),
                    device_seq: None,
                    reading_id,
                    topic: self.pipeline.topics.events(),
                    payload,
                };
                self.submit(Kind::DecodeFailed, record, None, live).await
            }
        }
    }

    /// Validates, attributes and journals one complete measurement; `live`: indicated as it was measured
    /// ([`RecordSink::live_value`]).
    async fn measurement(
        &mut self,
        session: &SessionInfo,
        mut m: Measurement,
        received_utc: i64,
        live: bool,
    ) -> Result<(), SinkError> {
        let device = &session.device.id;
        let key = cursor_key(device, &m);
        if let Measurement::Glucose(g) = &mut m {
            g.numbering = session.device.numbering;
        }
        let device_seq = match &m {
            Measurement::Glucose(g) if g.numbering == RecordNumbering::Gls => {
                Some(u64::from(g.sequence_number))
            }
            // No lasting record number (a newest-first meter, a cuff): the collector hands over only new
            // readings, in the order the device keeps them; each one's cursor counts it and carries its
            // time, by which the next session finds it again.
            _ => {
                let time = match &m {
                    Measurement::Glucose(g) => g.device_time(),
                    Measurement::BloodPressure(b) => b.timestamp,
                }
                .and_then(|t| t.to_epoch_seconds());
                let n = match self.marked_counts.get(&key) {
                    Some(n) => n + 1,
                    None => marked_count(self.journal().cursor(&key)) + 1,
                };
                self.marked_counts.insert(key.clone(), n);
                Some(marked_cursor(n, time))
            }
        };
        let rx = Reception {
            received_utc,
            clock_offset_s: session.clock_offset_s,
        };
        let verdict = validate(&m, &rx);
        let user_id = match &m {
            Measurement::BloodPressure(b) => b.user_id,
            Measurement::Glucose(_) => None,
        };
        let gateway = self.pipeline.gateway_id.clone();
        let reading_id = wire::reading_id_of(device, &m).to_string();
        // A kiosk's shared device has no binding: its session decides (crate::kiosk::attribution).
        let kiosk = self.pipeline.bindings.kiosk_of(device);
        let mut kiosk_session = None;
        let mut kiosk_hold = None;
        let patient = match &kiosk {
            None => self.pipeline.bindings.patient(device, user_id),
            Some(k) => {
                let kind = match &m {
                    Measurement::Glucose(_) => crate::kiosk::MeasurementKind::Glucose,
                    Measurement::BloodPressure(_) => crate::kiosk::MeasurementKind::BloodPressure,
                };
                let trusted = verdict
                    .time
                    .corrected_utc
                    .filter(|_| verdict.time.doubt.is_none());
                match k.attribute(device, kind, received_utc, trusted, live) {
                    crate::kiosk::attribution::Attribution::Patient { session, patient } => {
                        kiosk_session = Some(session);
                        Some(patient)
                    }
                    crate::kiosk::attribution::Attribution::Held(reason) => {
                        kiosk_hold = Some(reason);
                        None
                    }
                }
            }
        };
        let mut evaluate = None;
        let (kind, topic, payload) = if let Some(event) =
            Event::for_excluded(device, patient.as_deref(), &m, &verdict)
        {
            tracing::info!(device = %device, reading_id = %reading_id, "reading excluded from the patient record");
            (
                Kind::Rejected,
                self.pipeline.topics.events(),
                event_json(&gateway, received_utc, event)?,
            )
        } else if let Some(patient) = patient {
            let dref = wire::DeviceRef {
                id: device.clone(),
                model: session.device.model.clone(),
                user_id: None,
            };
            let msg =
                ReadingMessage::new(&gateway, &patient, dref, &m, &verdict, &rx).map_err(|e| {
                    SinkError::Unavailable(format!("cannot build the reading message: {e}"))
                })?;
            let payload =
                serde_json::to_vec(&msg).map_err(|e| SinkError::Unavailable(e.to_string()))?;
            let kiosk = match (kiosk, kiosk_session) {
                (Some(k), Some(session)) => Some((k, session, Box::new(msg.body))),
                _ => None,
            };
            if self.pipeline.alerts.is_some() || kiosk.is_some() {
                evaluate = Some(Box::new(ToEvaluate {
                    patient: patient.clone(),
                    reading_id: reading_id.clone(),
                    time_utc: verdict.time.corrected_utc.unwrap_or(received_utc),
                    measurement: m,
                    verdict,
                    kiosk,
                    ticket: self.pipeline.alerts.as_ref().map(|a| a.ticket()),
                }));
            }
            (Kind::Reading, self.pipeline.topics.readings(), payload)
        } else {
            tracing::info!(device = %device, reading_id = %reading_id, "reading of an unbound device held as unattributed");
            let dref = wire::DeviceRef {
                id: device.clone(),
                model: session.device.model.clone(),
                user_id: None,
            };
            // The event carries the whole reading: the journaled event is its durable copy (promise 6).
            let event = Event::unattributed(dref, &m, &verdict, &rx).map_err(|e| {
                SinkError::Unavailable(format!("cannot build the unattributed event: {e}"))
            })?;
            if let (Some(k), Some(reason), Event::Unattributed { reading, .. }) =
                (&kiosk, kiosk_hold, &event)
            {
                // Held for staff before the event is journaled (the cursor moves with the journal):
                // a crash in between re-delivers the reading, which the hold keeps once.
                let (k, reading, id) = (k.clone(), (**reading).clone(), reading_id.clone());
                tokio::task::spawn_blocking(move || k.hold(&id, reason, &reading))
                    .await
                    .map_err(|e| SinkError::Unavailable(e.to_string()))?
                    .map_err(|e| SinkError::Unavailable(e.to_string()))?;
            }
            (
                Kind::Unattributed,
                self.pipeline.topics.events(),
                event_json(&gateway, received_utc, event)?,
            )
        };
        // A held kiosk reading's event is journaled under an id of its own: its reading id is the
        // reading's, published once staff assign it — which must not be taken for a duplicate of the
        // event while that is still pending.
        let record_id = if kind == Kind::Unattributed && kiosk_hold.is_some() {
            format!("unattributed:{reading_id}")
        } else {
            reading_id
        };
        self.submit(
            kind,
            NewRecord {
                device: key,
                device_seq,
                reading_id: record_id,
                topic,
                payload,
            },
            evaluate,
            live,
        )
        .await
    }
}

impl Drop for SessionSink {
    /// A session can end without [`RecordSink::end_of_transfer`]: its deadline passed, or it failed (a
    /// dropped link). The readings it received intact are still journaled — those staged are handed
    /// over now, those handed over may still be accepted by the writer — and their edge alerts (decided
    /// once each is accepted) must not be lost with the session: a background task does both. Nothing to
    /// do (the usual case) costs nothing.
    fn drop(&mut self) {
        let evaluations = self.pipeline.alerts.is_some()
            && !(self.alerts_due.is_empty() && self.in_flight.iter().all(|(_, _, e)| e.is_none()));
        if self.detached || (self.staged.is_empty() && !evaluations) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime (a test's teardown): a glucometer keeps what the journal never accepted
            // (the cursor comes from the journal) and sends it again at the next session.
            tracing::warn!(
                staged = self.staged.len(),
                "a session ended outside the runtime: its staged records are left on the device, the edge alerts of its last readings to ingest"
            );
            return;
        };
        let mut rest = SessionSink {
            pipeline: self.pipeline.clone(),
            joiner: ContextJoiner::new(),
            staged: std::mem::take(&mut self.staged),
            in_flight: std::mem::take(&mut self.in_flight),
            alerts_due: std::mem::take(&mut self.alerts_due),
            refused: self.refused.clone(),
            marked_counts: HashMap::new(),
            // If the runtime is shutting down and drops this task unpolled, it must not spawn again.
            detached: true,
        };
        runtime.spawn(async move {
            // Errors were counted and logged where they arose; the readings are in the journal or not.
            let _ = rest.finish().await;
        });
    }
}

fn event_json(gateway: &str, time_utc: i64, event: Event) -> Result<Vec<u8>, SinkError> {
    let msg = EventMessage::new(gateway, time_utc, event)
        .map_err(|e| SinkError::Unavailable(e.to_string()))?;
    serde_json::to_vec(&msg).map_err(|e| SinkError::Unavailable(e.to_string()))
}

impl RecordSink for SessionSink {
    fn cursor(&self, key: &str) -> Option<u64> {
        self.journal().cursor(key)
    }

    async fn value(
        &mut self,
        session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
    ) -> Result<(), SinkError> {
        self.take_value(session, uuid, bytes, received_utc, false)
            .await
    }

    async fn live_value(
        &mut self,
        session: &SessionInfo,
        uuid: u16,
        bytes: &[u8],
        received_utc: i64,
    ) -> Result<(), SinkError> {
        self.take_value(session, uuid, bytes, received_utc, true)
            .await
    }

    fn live(&mut self, session: &SessionInfo, uuid: u16, bytes: &[u8]) {
        use protocol::gatt::bp::{IntermediateCuffPressure, PressureUnit};
        if uuid != uuid::INTERMEDIATE_CUFF_PRESSURE {
            return;
        }
        let Some(kiosk) = self.pipeline.bindings.kiosk_of(&session.device.id) else {
            return;
        };
        let Ok(p) = IntermediateCuffPressure::parse(bytes) else {
            return; // a display value: a damaged one is simply not shown
        };
        let mmhg = p.cuff_pressure.value().map(|v| match p.unit {
            PressureUnit::MmHg => v,
            PressureUnit::KPa => v * protocol::model::MMHG_PER_KPA,
        });
        if let Some(mmhg) = mmhg.filter(|v| v.is_finite() && (0.0..=400.0).contains(v)) {
            kiosk.cuff_pressure(&session.device.id, mmhg as f32);
        }
    }

    async fn end_of_transfer(&mut self, session: &SessionInfo) -> Result<(), SinkError> {
        if let Some(held) = self.joiner.finish() {
            self.measurement(
                session,
                Measurement::Glucose(held),
                crate::sources::collector::now_utc(),
                false,
            )
            .await?;
        }
        // The readings, then the alerts they raised, decided as they were accepted.
        self.finish().await
    }
}
