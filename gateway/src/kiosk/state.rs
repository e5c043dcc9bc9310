//! The kiosk's state: the session, the hold, the patient screen — and [`KioskControl`] over them.
//!
//! The pipeline asks [`Kiosk::attribute`] for every reading of a kiosk device (where it resolves device
//! bindings for the other devices), holds what it is told to hold ([`Kiosk::hold`]), and reports each
//! attributed reading once it is accepted, with the edge engine's decision ([`Kiosk::result`]). Staff and
//! the card reader open and close sessions; a task ends a session after the idle timeout
//! ([`Kiosk::run_idle`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::link::Indication;
use protocol::rules::{AlertAction, AlertStatus, Severity, Symptom, Symptoms};
use protocol::wire::{self, Event, EventMessage, ReadingBody, ReadingMessage};
use tokio::sync::{Notify, watch};

use super::attribution::{Attribution, HoldReason, ReadingTimes, SessionLog, attribute};
use super::card::CardKey;
use super::hold::{HeldEntry, Hold, HoldError, Shown};
use super::{
    Advice, CardReaderFailure, CardReaderView, CheckInBy, DeviceFailure, DeviceView, KioskControl,
    KioskError, MeasurementKind, PatientScreen, ResultView, SessionView, StaffId, StaffView,
    SymptomQuestion,
};
use crate::journal::NewRecord;
use crate::pipeline::Pipeline;
use crate::pipeline::writer::Refusal;

/// What a kiosk is configured with (`[kiosk]`).
#[derive(Debug, Clone)]
pub struct KioskSettings {
    /// The shared kiosk devices (device ids).
    pub devices: Vec<String>,
    /// A session ends after this long without activity.
    pub idle_timeout: Duration,
    /// Where the hold is kept.
    pub hold_file: PathBuf,
    /// At most this many readings held (`[kiosk] max_held`).
    pub max_held: usize,
    /// The per-deployment card key; `None`: cards are not used (staff check-in only).
    pub card_key: Option<CardKey>,
}

/// How long an unknown card's message stays on the screen.
const CARD_UNKNOWN_FOR: Duration = Duration::from_secs(5);
/// The longest discard reason, characters.
const MAX_REASON: usize = 200;
/// A device that sent a value this recently is shown as connected.
const CONNECTED_WITHIN_S: i64 = 30;

/// The kiosk.
pub struct Kiosk {
    devices: HashSet<String>,
    idle_timeout: Duration,
    card_key: Option<CardKey>,
    inner: Mutex<Inner>,
    hold: Mutex<Hold>,
    /// Card hash → patient, from the CRM's configuration.
    cards: Mutex<HashMap<String, String>>,
    screen: watch::Sender<PatientScreen>,
    /// Wakes the idle timer when a session starts, ends or sees activity.
    activity: Notify,
    /// Journals assignments, discards and symptom answers; taken away at shutdown ([`Kiosk::detach`]).
    pipeline: Mutex<Option<Pipeline>>,
    /// The card reader, when there is one: `Show` as the session goes on.
    reader: Mutex<Option<crate::sources::card_reader::CardReader>>,
    /// The uplink's connection, as last seen.
    broker_connected: Arc<AtomicBool>,
    /// The Bluetooth source's device records (last failure, battery), when the kiosk's devices are real
    /// ones.
    ble: Mutex<Option<crate::sources::ble::BleStatusHandle>>,
}

impl std::fmt::Debug for Kiosk {
    /// Counts only: the state holds patient ids and readings, which have no place in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kiosk")
            .field("devices", &self.devices.len())
            .field("idle_timeout", &self.idle_timeout)
            // Never wait for the lock from a Debug (it may be held by the caller).
            .field(
                "held",
                &self.hold.try_lock().ok().map(|h| h.entries().len()),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    log: SessionLog,
    next_session: u64,
    current: Option<Current>,
    /// Per kiosk device: kind, last value received (Unix s), last failure.
    seen: BTreeMap<String, (Option<MeasurementKind>, i64)>,
}

#[derive(Debug, Clone)]
struct Current {
    session: u64,
    patient: String,
    by: CheckInBy,
    started_utc: i64,
    /// Last activity (check-in, a reading, an answer), Unix s: the idle timeout counts from it.
    active_utc: i64,
    /// The latest result shown, and the question still open.
    result: Option<ResultView>,
}

impl Current {
    fn hint(&self) -> String {
        patient_hint(&self.patient)
    }
}

/// At most the last 4 characters of a pseudonymous id (what the patient page may show).
pub fn patient_hint(patient: &str) -> String {
    let chars: Vec<char> = patient.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect()
}

impl Kiosk {
    /// A kiosk with its hold loaded from `settings.hold_file`.
    ///
    /// # Errors
    /// The hold file exists but cannot be read.
    pub fn open(settings: KioskSettings) -> Result<Kiosk, HoldError> {
        let hold = Hold::open(&settings.hold_file, settings.max_held)?;
        let (screen, _) = watch::channel(PatientScreen::Idle);
        // Session numbers from the clock in milliseconds: a page open across a restart never sees a
        // number again for another patient.
        let next_session = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        )
        .unwrap_or(1);
        Ok(Kiosk {
            devices: settings.devices.into_iter().collect(),
            idle_timeout: settings.idle_timeout,
            card_key: settings.card_key,
            inner: Mutex::new(Inner {
                next_session,
                ..Inner::default()
            }),
            hold: Mutex::new(hold),
            cards: Mutex::new(HashMap::new()),
            screen,
            activity: Notify::new(),
            pipeline: Mutex::new(None),
            reader: Mutex::new(None),
            broker_connected: Arc::new(AtomicBool::new(false)),
            ble: Mutex::new(None),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data, consistent after every statement: a poisoned lock still holds valid state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold_lock(&self) -> std::sync::MutexGuard<'_, Hold> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the kiosk the pipeline it journals through (after the pipeline is built).
    pub fn attach(&self, pipeline: Pipeline) {
        *self.pipeline.lock().unwrap_or_else(|p| p.into_inner()) = Some(pipeline);
    }

    /// Lets go of the pipeline, so the journal writer can stop (the pipeline's bindings refer back to
    /// the kiosk). Called at shutdown after the device sessions and the web server have ended.
    pub fn detach(&self) {
        self.pipeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The card reader board as staff should see it, when there is one.
    fn card_reader_view(&self) -> Option<CardReaderView> {
        use protocol::link::ReaderFault;
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let status = reader.status();
        let connected = reader.answering(tokio::time::Instant::now());
        let fault = status.last_fault.map(|f| match f {
            ReaderFault::NotResponding => CardReaderFailure::ReaderNotResponding,
            ReaderFault::Bus => CardReaderFailure::ReaderBus,
            ReaderFault::Init => CardReaderFailure::ReaderInit,
        });
        let failure = if !status.port_open {
            Some(CardReaderFailure::BoardUnplugged)
        } else if !connected {
            Some(CardReaderFailure::BoardSilent)
        } else {
            fault
        };
        Some(CardReaderView {
            connected,
            reader_ok: status.reader_ok,
            failure,
        })
    }

    /// Gives the kiosk the card reader it sends `Show` to.
    pub fn attach_reader(&self, reader: crate::sources::card_reader::CardReader) {
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
    }

    /// Gives the kiosk the Bluetooth source's status (each device's last failure and battery level, for
    /// the staff page).
    pub fn attach_ble(&self, status: crate::sources::ble::BleStatusHandle) {
        *self.ble.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    /// Where the uplink reports whether it is connected (shown on the staff page).
    pub fn broker_flag(&self) -> Arc<AtomicBool> {
        self.broker_connected.clone()
    }

    fn pipeline(&self) -> Option<Pipeline> {
        self.pipeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `device` is one of this kiosk's shared devices.
    pub fn has_device(&self, device: &str) -> bool {
        self.devices.contains(device)
    }

    /// Replaces the card map (from the CRM's configuration: card hash → patient).
    pub fn set_cards(&self, cards: HashMap<String, String>) {
        *self.cards.lock().unwrap_or_else(|p| p.into_inner()) = cards;
    }

    /// The current screen.
    pub fn screen_now(&self) -> PatientScreen {
        self.screen.borrow().clone()
    }

    // ---------------------------------------------------------------------------------------------
    // The pipeline's side
    // ---------------------------------------------------------------------------------------------

    /// Who a reading of a kiosk device belongs to (see [`super::attribution`]); `live`: indicated as it
    /// was measured (`RecordSink::live_value`), not from the device's memory. A reading attributed to the
    /// open session counts as activity and shows "measuring" until its result is in.
    pub fn attribute(
        &self,
        device: &str,
        kind: MeasurementKind,
        received_utc: i64,
        trusted_measured_utc: Option<i64>,
        live: bool,
    ) -> Attribution {
        let times = ReadingTimes {
            trusted_measured_utc,
            received_utc,
            from_memory: !live,
        };
        let mut inner = self.inner();
        inner
            .seen
            .insert(device.to_owned(), (Some(kind), received_utc));
        let got = attribute(&inner.log.spans(), &times);
        if let Attribution::Patient { session, .. } = &got
            && let Some(c) = inner.current.as_mut()
            && c.session == *session
        {
            c.active_utc = c.active_utc.max(received_utc);
            let screen = PatientScreen::Measuring {
                session: c.session,
                patient_hint: c.hint(),
                kind,
                cuff_pressure_mmhg: None,
            };
            drop(inner);
            self.screen.send_replace(screen);
            self.activity.notify_one();
            self.show(Indication::Measuring);
        }
        got
    }

    /// A kiosk cuff's pressure while it measures (Intermediate Cuff Pressure): "measuring" with the
    /// pressure, for the checked-in patient; nothing without a session (it may be anyone's arm).
    pub fn cuff_pressure(&self, device: &str, mmhg: f32) {
        let now = crate::sources::collector::now_utc();
        let mut inner = self.inner();
        inner.seen.insert(
            device.to_owned(),
            (Some(MeasurementKind::BloodPressure), now),
        );
        let Some(c) = inner.current.as_mut() else {
            return;
        };
        c.active_utc = c.active_utc.max(now);
        let screen = PatientScreen::Measuring {
            session: c.session,
            patient_hint: c.hint(),
            kind: MeasurementKind::BloodPressure,
            cuff_pressure_mmhg: Some(mmhg.round()),
        };
        drop(inner);
        let was_measuring = matches!(self.screen_now(), PatientScreen::Measuring { .. });
        self.screen.send_replace(screen);
        if !was_measuring {
            self.activity.notify_one();
            self.show(Indication::Measuring);
        }
    }

    /// Holds a kiosk reading for staff (durably, before its `unattributed` event is journaled). `Ok(false)`:
    /// held already (a re-delivery).
    ///
    /// # Errors
    /// The hold file could not be written: the reading must not be accepted (the device keeps it).
    pub fn hold(
        &self,
        reading_id: &str,
        reason: HoldReason,
        reading: &ReadingBody,
    ) -> Result<bool, HoldError> {
        let added = self.hold_lock().insert(HeldEntry {
            reading_id: reading_id.to_owned(),
            reason,
            reading: reading.clone(),
        })?;
        if added {
            tracing::info!(reason = reason.name(), "kiosk reading held as unattributed");
        }
        Ok(added)
    }

    /// The result of an attributed reading, once it is accepted: shown if its session is still the
    /// current one (never to the next patient).
    pub fn result(
        &self,
        session: u64,
        reading_id: &str,
        body: &ReadingBody,
        actions: Option<&[AlertAction]>,
    ) {
        let shown = Shown::of(body);
        let (advice, question) = match actions {
            Some(a) => advice_of(a),
            // Alerts off: the page shows the value; `[kiosk]` requires alerts, so this is a test setup.
            None => (Advice::Normal, None),
        };
        let view = ResultView {
            reading_id: reading_id.to_owned(),
            kind: shown.kind,
            value: shown.value,
            unit: shown.unit,
            pulse_bpm: shown.pulse_bpm,
            advice,
            question,
        };
        let mut inner = self.inner();
        let Some(c) = inner.current.as_mut().filter(|c| c.session == session) else {
            return;
        };
        c.result = Some(view.clone());
        let screen = PatientScreen::Result {
            session,
            patient_hint: c.hint(),
            result: view,
        };
        drop(inner);
        self.screen.send_replace(screen);
        self.activity.notify_one();
        self.show(indication_of(advice));
    }

    // ---------------------------------------------------------------------------------------------
    // Sessions
    // ---------------------------------------------------------------------------------------------

    fn open_session(&self, patient: &str, by: CheckInBy, now: i64) -> SessionView {
        let mut inner = self.inner();
        inner.next_session += 1;
        let session = inner.next_session;
        inner.log.open(session, patient, now);
        inner.log.prune(now);
        let c = Current {
            session,
            patient: patient.to_owned(),
            by,
            started_utc: now,
            active_utc: now,
            result: None,
        };
        let view = self.session_view(&c);
        let screen = PatientScreen::CheckedIn {
            session,
            patient_hint: c.hint(),
        };
        inner.current = Some(c);
        drop(inner);
        tracing::info!(session, by = ?by, "kiosk check-in");
        self.screen.send_replace(screen);
        self.activity.notify_one();
        self.show(Indication::CheckedIn);
        view
    }

    fn close_session(&self, now: i64, why: &'static str) -> bool {
        let mut inner = self.inner();
        let Some(c) = inner.current.take() else {
            return false;
        };
        inner.log.close(now);
        drop(inner);
        tracing::info!(session = c.session, why, "kiosk session ended");
        self.screen.send_replace(PatientScreen::Idle);
        self.activity.notify_one();
        self.show(Indication::Ready);
        true
    }

    fn session_view(&self, c: &Current) -> SessionView {
        let expires = c.active_utc + i64::try_from(self.idle_timeout.as_secs()).unwrap_or(i64::MAX);
        SessionView {
            session: c.session,
            patient: c.patient.clone(),
            by: c.by,
            started_utc: wire::rfc3339_utc(c.started_utc).unwrap_or_default(),
            expires_utc: wire::rfc3339_utc(expires).unwrap_or_default(),
        }
    }

    /// A card on the reader: the session of the patient the CRM maps its hash to, or "card unknown".
    pub fn card_presented(self: &Arc<Self>, uid: &[u8], now: i64) {
        let patient = self.card_key.as_ref().and_then(|key| {
            let hash = key.hash(uid);
            self.cards
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&hash)
                .cloned()
        });
        match patient {
            Some(p) => {
                self.open_session(&p, CheckInBy::Card, now);
            }
            None => {
                // The hash is not logged either: with the key it names the card.
                tracing::info!("kiosk: a card no patient is registered for");
                self.screen.send_replace(PatientScreen::CardUnknown);
                self.show(Indication::Error);
                let kiosk = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(CARD_UNKNOWN_FOR).await;
                    if kiosk.screen_now() == PatientScreen::CardUnknown {
                        kiosk.screen.send_replace(kiosk.base_screen());
                    }
                });
            }
        }
    }

    /// What the screen shows when nothing new happens: the session's state, or idle.
    fn base_screen(&self) -> PatientScreen {
        let inner = self.inner();
        match &inner.current {
            None => PatientScreen::Idle,
            Some(c) => match &c.result {
                Some(r) => PatientScreen::Result {
                    session: c.session,
                    patient_hint: c.hint(),
                    result: r.clone(),
                },
                None => PatientScreen::CheckedIn {
                    session: c.session,
                    patient_hint: c.hint(),
                },
            },
        }
    }

    /// Ends the session after the idle timeout; runs until `shutdown`.
    pub async fn run_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let notified = self.activity.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let expires = {
                let inner = self.inner();
                inner.current.as_ref().map(|c| {
                    c.active_utc + i64::try_from(self.idle_timeout.as_secs()).unwrap_or(i64::MAX)
                })
            };
            let now = crate::sources::collector::now_utc();
            if let Some(e) = expires
                && e <= now
            {
                self.close_session(e, "idle timeout");
                continue;
            }
            let wait = expires.map_or(Duration::from_secs(3600), |e| {
                Duration::from_secs(u64::try_from(e - now).unwrap_or(0))
            });
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// What the board should show for the screen now.
    fn indication_now(&self) -> Indication {
        match self.screen_now() {
            PatientScreen::Idle => Indication::Ready,
            PatientScreen::CardUnknown => Indication::Error,
            PatientScreen::CheckedIn { .. } => Indication::CheckedIn,
            PatientScreen::Measuring { .. } => Indication::Measuring,
            PatientScreen::Result { result, .. } => indication_of(result.advice),
        }
    }

    fn show(&self, indication: Indication) {
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(r) = reader {
            tokio::spawn(async move {
                r.show(indication).await;
            });
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Journaling
    // ---------------------------------------------------------------------------------------------

    async fn journal(&self, records: Vec<NewRecord>) -> Result<(), KioskError> {
        let pipeline = self
            .pipeline()
            .ok_or_else(|| KioskError::Storage("the gateway is stopping".into()))?;
        let refused = Arc::new(AtomicBool::new(false));
        for record in records {
            let rx = pipeline
                .writer
                .submit(record, refused.clone())
                .await
                .map_err(|e| KioskError::Storage(e.to_string()))?;
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(KioskError::Storage(e.to_string())),
                Err(_) => {
                    return Err(KioskError::Storage(
                        Refusal::Failed("writer stopped".into()).to_string(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn event_record(
        &self,
        pipeline: &Pipeline,
        record_id: String,
        device: &str,
        now: i64,
        event: Event,
    ) -> Result<NewRecord, KioskError> {
        let msg = EventMessage::new(&pipeline.gateway_id, now, event)
            .map_err(|e| KioskError::Storage(e.to_string()))?;
        Ok(NewRecord {
            device: device.to_owned(),
            device_seq: None,
            reading_id: record_id,
            topic: pipeline.topics.events(),
            payload: serde_json::to_vec(&msg).map_err(|e| KioskError::Storage(e.to_string()))?,
        })
    }

    /// The records that carry a symptom answer: the edge engine's decisions, and (the "symptoms" branch
    /// fills this in through [`crate::alerts::EdgeAlerts::on_symptoms`]) the report for ingest.
    fn symptom_answer_records(
        pipeline: &Pipeline,
        patient: &str,
        reading_id: &str,
        symptoms: Symptoms,
        now: i64,
    ) -> Vec<NewRecord> {
        match &pipeline.alerts {
            Some(a) => a.on_symptoms(patient, reading_id, symptoms, now),
            None => Vec::new(),
        }
    }
}

/// The card reader board's device id in `device_error` events (its serial path is not an id: it holds '/').
pub const CARD_READER_DEVICE: &str = "card-reader";

/// Runs the card reader board: each card presented checks its patient in (or shows "card unknown"), and
/// the kiosk sends the board `Show` as the session goes on. Runs until `shutdown`.
pub async fn card_reader_task(
    kiosk: Arc<Kiosk>,
    config: crate::sources::card_reader::Config,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use crate::sources::card_reader::{self, Event};
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let (reader, task) = card_reader::spawn(config, tx, shutdown.clone());
    kiosk.attach_reader(reader);
    // The board is unreachable (port gone or never opened) since the last `device_error` about it: one
    // event per streak, until the board says hello again.
    let mut down = false;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            e = rx.recv() => e,
        };
        // What to tell the CRM (`device_error` on …/events): stage and cause, never a card UID.
        let problem = match event {
            None => break,
            Some(Event::CardPresented(uid)) => {
                kiosk.card_presented(uid.as_bytes(), crate::sources::collector::now_utc());
                None
            }
            // A board that (re)starts shows what the kiosk is doing now.
            Some(Event::Hello(_)) => {
                down = false;
                kiosk.show(kiosk.indication_now());
                None
            }
            Some(Event::Fault(fault)) => Some((
                "reader",
                format!("the board's card reader failed: {fault:?}"),
            )),
            Some(Event::Unplugged) if !down => {
                down = true;
                Some((
                    "link",
                    "the card reader board's serial port went away".to_owned(),
                ))
            }
            Some(Event::OpenFailed(cause)) if !down => {
                down = true;
                Some((
                    "open",
                    format!("the card reader board's serial port cannot be opened: {cause}"),
                ))
            }
            Some(Event::Unplugged | Event::OpenFailed(_)) => None,
        };
        if let (Some((stage, cause)), Some(pipeline)) = (problem, kiosk.pipeline()) {
            crate::sources::notice::report_device_error(
                &pipeline,
                CARD_READER_DEVICE,
                stage,
                &cause,
            )
            .await;
        }
    }
    let _ = task.await;
}

/// The patient page's words for the engine's decisions on one reading.
pub fn advice_of(actions: &[AlertAction]) -> (Advice, Option<SymptomQuestion>) {
    let raised: Vec<_> = actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                AlertAction::Open(_) | AlertAction::Escalate { .. } | AlertAction::Confirm { .. }
            )
        })
        .map(AlertAction::alert)
        .collect();
    let serious = |s: Severity| s >= Severity::Urgent;
    let question = raised.iter().find_map(|a| match a.family.as_str() {
        "BP_HIGH" if serious(a.severity) => Some(SymptomQuestion::CrisisSymptoms),
        "GLU_LOW" if serious(a.severity) => Some(SymptomQuestion::LowGlucoseSymptoms),
        _ => None,
    });
    let advice = if raised
        .iter()
        .any(|a| a.status == AlertStatus::Active && serious(a.severity))
    {
        Advice::SeeNurse
    } else if raised.iter().any(|a| a.status == AlertStatus::Pending) {
        Advice::MeasureAgain
    } else if raised.iter().any(|a| a.family.contains("LOW")) {
        Advice::Low
    } else if raised.iter().any(|a| a.family.contains("HIGH")) {
        Advice::High
    } else {
        Advice::Normal
    };
    (advice, question)
}

fn indication_of(advice: Advice) -> Indication {
    match advice {
        Advice::SeeNurse => Indication::SeeANurse,
        Advice::Normal | Advice::Low | Advice::High | Advice::MeasureAgain => Indication::ResultOk,
    }
}

fn check_patient(patient: &str) -> Result<(), KioskError> {
    if wire::is_valid_pseudonym(patient) {
        Ok(())
    } else {
        Err(KioskError::InvalidPatient(
            "letters, digits and '._:-', with at least one letter and one digit".into(),
        ))
    }
}

impl KioskControl for Kiosk {
    fn screen(&self) -> watch::Receiver<PatientScreen> {
        self.screen.subscribe()
    }

    fn staff_view(&self) -> StaffView {
        let now = crate::sources::collector::now_utc();
        let inner = self.inner();
        let session = inner.current.as_ref().map(|c| self.session_view(c));
        let mut devices: Vec<DeviceView> = self
            .devices
            .iter()
            .map(|d| {
                let seen = inner.seen.get(d);
                DeviceView {
                    device: d.clone(),
                    kind: seen.and_then(|(k, _)| *k),
                    connected: seen.is_some_and(|(_, t)| now - t <= CONNECTED_WITHIN_S),
                    battery_percent: None,
                    battery_low: false,
                    failure: None,
                }
            })
            .collect();
        drop(inner);
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        let ble = self.ble.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(ble) = ble {
            let snapshot = ble.snapshot();
            for d in &mut devices {
                let Some(s) = snapshot.devices.get(&d.device) else {
                    continue;
                };
                if let Some(f) = &s.last_failure {
                    d.failure = Some(DeviceFailure {
                        stage: f.stage.clone(),
                        cause: f.cause.clone(),
                    });
                }
                // The last level read, however old: staff see "23 %" and swap batteries before the
                // cuff dies mid-clinic; a device without a Battery Service stays blank.
                d.battery_percent = s.battery.map(|b| b.percent);
                d.battery_low = s.battery.is_some_and(|b| b.is_low());
            }
        }
        let journal_depth = self
            .pipeline()
            .and_then(|p| p.journal.try_lock().ok().map(|j| j.depth()))
            .unwrap_or(0);
        StaffView {
            session,
            held: self.hold_lock().view(),
            devices,
            card_reader: self.card_reader_view(),
            journal_depth,
            broker_connected: self.broker_connected.load(Ordering::Relaxed),
        }
    }

    async fn check_in(&self, patient: &str, by: &StaffId) -> Result<SessionView, KioskError> {
        check_patient(patient)?;
        tracing::debug!(staff = %by.0, "staff check-in");
        Ok(self.open_session(
            patient,
            CheckInBy::Staff,
            crate::sources::collector::now_utc(),
        ))
    }

    async fn check_out(&self, by: Option<&StaffId>) -> Result<(), KioskError> {
        let why = if by.is_some() {
            "staff check-out"
        } else {
            "patient done"
        };
        self.close_session(crate::sources::collector::now_utc(), why);
        Ok(())
    }

    async fn assign(
        &self,
        reading_id: &str,
        patient: &str,
        by: &StaffId,
    ) -> Result<(), KioskError> {
        check_patient(patient)?;
        let entry = self
            .hold_lock()
            .get(reading_id)
            .cloned()
            .ok_or(KioskError::NoSuchReading)?;
        let pipeline = self
            .pipeline()
            .ok_or_else(|| KioskError::Storage("the gateway is stopping".into()))?;
        let now = crate::sources::collector::now_utc();
        let reading = ReadingMessage {
            schema: wire::READING_SCHEMA.to_owned(),
            id: entry.reading_id.clone(),
            gateway: pipeline.gateway_id.clone(),
            patient: patient.to_owned(),
            body: entry.reading.clone(),
        };
        let device = entry.reading.device.id.clone();
        let records = vec![
            NewRecord {
                device: device.clone(),
                device_seq: None,
                // The reading's own id: the CRM upserts on it.
                reading_id: entry.reading_id.clone(),
                topic: pipeline.topics.readings(),
                payload: serde_json::to_vec(&reading)
                    .map_err(|e| KioskError::Storage(e.to_string()))?,
            },
            self.event_record(
                &pipeline,
                format!("assigned:{}", entry.reading_id),
                &device,
                now,
                Event::ReadingAssigned {
                    reading_id: entry.reading_id.clone(),
                    device: device.clone(),
                    kind: entry.reading.kind,
                    from: "unattributed".to_owned(),
                    held_reason: entry.reason.name().to_owned(),
                    patient: patient.to_owned(),
                    staff: by.0.clone(),
                },
            )?,
        ];
        self.journal(records).await?;
        self.hold_lock()
            .remove(reading_id)
            .map_err(|e| KioskError::Storage(e.to_string()))?;
        tracing::info!(staff = %by.0, "held kiosk reading assigned");
        Ok(())
    }

    async fn discard(
        &self,
        reading_id: &str,
        reason: &str,
        by: &StaffId,
    ) -> Result<(), KioskError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(KioskError::InvalidReason("required".into()));
        }
        if reason.chars().count() > MAX_REASON {
            return Err(KioskError::InvalidReason(format!(
                "at most {MAX_REASON} characters"
            )));
        }
        let entry = self
            .hold_lock()
            .get(reading_id)
            .cloned()
            .ok_or(KioskError::NoSuchReading)?;
        let pipeline = self
            .pipeline()
            .ok_or_else(|| KioskError::Storage("the gateway is stopping".into()))?;
        let now = crate::sources::collector::now_utc();
        let device = entry.reading.device.id.clone();
        let record = self.event_record(
            &pipeline,
            format!("discarded:{}", entry.reading_id),
            &device,
            now,
            Event::ReadingDiscarded {
                reading_id: entry.reading_id.clone(),
                device: device.clone(),
                kind: entry.reading.kind,
                held_reason: entry.reason.name().to_owned(),
                reason: reason.to_owned(),
                staff: by.0.clone(),
            },
        )?;
        self.journal(vec![record]).await?;
        self.hold_lock()
            .remove(reading_id)
            .map_err(|e| KioskError::Storage(e.to_string()))?;
        tracing::info!(staff = %by.0, "held kiosk reading discarded");
        Ok(())
    }

    async fn answer_symptoms(
        &self,
        session: u64,
        reading_id: &str,
        yes: bool,
    ) -> Result<(), KioskError> {
        let now = crate::sources::collector::now_utc();
        let (patient, question) = {
            let mut inner = self.inner();
            let c = inner
                .current
                .as_mut()
                .filter(|c| c.session == session)
                .ok_or(KioskError::StaleSession)?;
            let r = c
                .result
                .as_ref()
                .filter(|r| r.reading_id == reading_id)
                .ok_or(KioskError::NoSuchReading)?;
            let question = r.question.ok_or(KioskError::NoSuchReading)?;
            c.active_utc = now;
            (c.patient.clone(), question)
        };
        if yes {
            let symptoms = Symptoms::of(&[match question {
                SymptomQuestion::CrisisSymptoms => Symptom::CrisisSymptoms,
                SymptomQuestion::LowGlucoseSymptoms => Symptom::SevereHypoglycaemia,
            }]);
            let pipeline = self
                .pipeline()
                .ok_or_else(|| KioskError::Storage("the gateway is stopping".into()))?;
            let records =
                Self::symptom_answer_records(&pipeline, &patient, reading_id, symptoms, now);
            let n = records.len();
            self.journal(records).await?;
            pipeline
                .counters
                .alerts
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        // The answer is in: the question goes, and "yes" means see a nurse now.
        let screen = {
            let mut inner = self.inner();
            let Some(c) = inner.current.as_mut().filter(|c| c.session == session) else {
                return Ok(());
            };
            let patient_hint = c.hint();
            let Some(r) = c.result.as_mut().filter(|r| r.reading_id == reading_id) else {
                return Ok(());
            };
            r.question = None;
            if yes {
                r.advice = Advice::SeeNurse;
            }
            PatientScreen::Result {
                session,
                patient_hint,
                result: r.clone(),
            }
        };
        let advice = match &screen {
            PatientScreen::Result { result, .. } => result.advice,
            _ => Advice::Normal,
        };
        self.screen.send_replace(screen);
        self.activity.notify_one();
        self.show(indication_of(advice));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ble::BleStatusHandle;

    fn kiosk(dir: &std::path::Path, devices: &[&str]) -> Kiosk {
        Kiosk::open(KioskSettings {
            devices: devices.iter().map(|d| (*d).to_owned()).collect(),
            idle_timeout: Duration::from_secs(300),
            hold_file: dir.join("kiosk-hold.json"),
            max_held: 1000,
            card_key: None,
        })
        .expect("an empty hold")
    }

    fn battery_of(view: &StaffView, device: &str) -> Option<u8> {
        view.devices
            .iter()
            .find(|d| d.device == device)
            .expect("the device is listed")
            .battery_percent
    }

    /// The staff view's battery comes from the BLE status: the level read for that device, nothing for a
    /// device never read (no Battery Service), and a newer read replaces an older one.
    #[test]
    fn staff_view_shows_the_battery_the_ble_source_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cuff, meter) = ("C0:26:DA:00:00:02", "C0:26:DA:00:00:01");
        let k = kiosk(dir.path(), &[cuff, meter]);
        let ble = BleStatusHandle::default();
        k.attach_ble(ble.clone());
        ble.record_battery(cuff, 87, 1_700_000_000);

        // The cuff's entry in the JSON the staff page reads.
        let cuff_json = |view: &StaffView| {
            let json = serde_json::to_value(view).expect("serialisable");
            json["devices"]
                .as_array()
                .expect("a device list")
                .iter()
                .find(|d| d["device"] == cuff)
                .cloned()
                .expect("the cuff is listed")
        };
        let view = k.staff_view();
        assert_eq!(battery_of(&view, cuff), Some(87));
        assert_eq!(battery_of(&view, meter), None);
        let d = view.devices.iter().find(|d| d.device == cuff).unwrap();
        assert_eq!(d.failure, None, "a battery read is not a failure");
        assert!(!d.battery_low, "87 % is not low");
        let json = cuff_json(&view);
        assert_eq!(json["battery_percent"], 87, "{json}");
        assert!(json.get("battery_low").is_none(), "{json}");

        ble.record_battery(cuff, 20, 1_700_000_300);
        let view = k.staff_view();
        let d = view.devices.iter().find(|d| d.device == cuff).unwrap();
        assert!(d.battery_low, "20 % is low: {d:?}");
        let json = cuff_json(&view);
        assert_eq!(json["battery_low"], true, "{json}");

        ble.record_battery(cuff, 23, 1_700_000_600);
        assert_eq!(battery_of(&k.staff_view(), cuff), Some(23));
    }

    /// After a restart the staff page shows what the last run saved (`device-status.json`): the
    /// battery level and the last failure, not "unknown" until each device's next session.
    #[test]
    fn staff_view_after_a_restart_shows_the_saved_battery_and_failure() {
        use crate::sources::ble::store::{Battery, DeviceStatus, DeviceStore, Failure};
        let dir = tempfile::tempdir().expect("tempdir");
        let (cuff, meter) = ("C0:26:DA:00:00:02", "C0:26:DA:00:00:01");
        let store = DeviceStore::new(dir.path().join("ble"));
        let saved = DeviceStatus {
            battery: Some(Battery {
                percent: 41,
                at: 1_700_000_000,
            }),
            ..DeviceStatus::default()
        };
        store.put_status(cuff, &saved).expect("written");
        let failed = DeviceStatus {
            last_failure: Some(Failure {
                stage: "connect".into(),
                cause: "timed out".into(),
                rssi: Some(-90),
                at: 1_700_000_100,
            }),
            consecutive_failures: 3,
            ..DeviceStatus::default()
        };
        store.put_status(meter, &failed).expect("written");

        // The next run: a fresh status, restored from the file before the first session.
        let k = kiosk(dir.path(), &[cuff, meter]);
        let ble = BleStatusHandle::default();
        k.attach_ble(ble.clone());
        assert_eq!(battery_of(&k.staff_view(), cuff), None, "nothing before");
        ble.restore(store.statuses().expect("readable"));
        let view = k.staff_view();
        assert_eq!(battery_of(&view, cuff), Some(41));
        let m = view.devices.iter().find(|d| d.device == meter).unwrap();
        assert_eq!(
            m.failure,
            Some(DeviceFailure {
                stage: "connect".into(),
                cause: "timed out".into()
            }),
            "the saved failure is shown: {m:?}"
        );
        let restored = ble.snapshot().devices[meter].clone();
        assert_eq!(
            restored.consecutive_failures, 0,
            "a new run reports its first failure and retries at the base interval"
        );

        // A device this run already read keeps its own, newer record.
        ble.record_battery(cuff, 90, 1_700_001_000);
        ble.restore(store.statuses().expect("readable"));
        assert_eq!(battery_of(&k.staff_view(), cuff), Some(90));
    }

    /// Without a BLE source (simulated devices only) the battery stays unknown.
    #[test]
    fn staff_view_without_ble_has_no_battery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kiosk(dir.path(), &["sim-cuff"]);
        assert_eq!(battery_of(&k.staff_view(), "sim-cuff"), None);
    }

    /// A device that never sent a value is listed without a kind (the configuration names ids only;
    /// a glucometer must not be shown as a cuff), and gets one with its first value.
    #[test]
    fn an_unseen_device_has_no_kind_until_its_first_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kiosk(dir.path(), &["clinic-meter"]);
        let kind = |k: &Kiosk| {
            k.staff_view()
                .devices
                .iter()
                .find(|d| d.device == "clinic-meter")
                .expect("listed")
                .kind
        };
        assert_eq!(kind(&k), None);
        let json = serde_json::to_value(k.staff_view()).expect("serialisable");
        assert!(json["devices"][0].get("kind").is_none(), "{json}");
        let now = crate::sources::collector::now_utc();
        let _ = k.attribute(
            "clinic-meter",
            MeasurementKind::Glucose,
            now,
            Some(now),
            false,
        );
        assert_eq!(kind(&k), Some(MeasurementKind::Glucose));
    }

    /// The card reader board on the staff page: absent without one; with one whose port cannot be
    /// opened, shown as not connected with the reason, and never as working.
    #[tokio::test]
    async fn staff_view_shows_a_card_reader_that_cannot_be_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kiosk(dir.path(), &["sim-cuff"]);
        assert_eq!(k.staff_view().card_reader, None);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let stop = tokio_util::sync::CancellationToken::new();
        let (reader, task) = crate::sources::card_reader::spawn(
            crate::sources::card_reader::Config::new(dir.path().join("no-such-tty")),
            tx,
            stop.clone(),
        );
        k.attach_reader(reader);
        let view = k.staff_view().card_reader.expect("a card reader row");
        assert!(!view.connected);
        assert_eq!(view.reader_ok, None, "never heard: unknown, not working");
        assert_eq!(
            view.failure,
            Some(CardReaderFailure::BoardUnplugged),
            "{view:?}"
        );
        stop.cancel();
        task.await.expect("the card reader task ends");
    }
}
