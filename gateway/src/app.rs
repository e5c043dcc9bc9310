//! The gateway assembled: sources → pipeline → journal → uplink, with a graceful, ordered shutdown.
//!
//! `run(config, shutdown)` is the whole daemon (STYLE.md practice 10): it opens the journal and reports
//! what recovery found, starts the journal writer, the uplink and one task per device, and when `shutdown`
//! fires stops in the order that loses nothing — device sessions first (their records are either fsynced
//! or still in the devices), then the writer, then the uplink, which waits briefly for outstanding PUBACKs
//! (what is not acked stays in the journal for the next start).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::wire::{StatusMessage, Topics};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::{Due, EdgeAlerts};
use crate::config::{Config, SimKind, SimulatedSection};
use crate::journal::NewRecord;
use crate::journal::{Journal, JournalConfig, Recovery};
use crate::liveness::{Heartbeat, Liveness};
use crate::pipeline::handoff::Handoff;
use crate::pipeline::{Bindings, Counters, Pipeline, writer};
use crate::sources::collector::{self, CollectorConfig, DeviceRef};
use crate::sources::simulator::cuff::{CuffConfig, SimCuff};
use crate::sources::simulator::glucometer::{GlucometerConfig, SimGlucometer};
use crate::sources::simulator::{SimDevice, SimLink, unix_now};
use crate::state_file;
use crate::uplink::{self, UplinkConfig, UplinkStats};

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The uplink settings are unusable (nothing was started). Shown with the configuration file's key
    /// names: the uplink's `uplink.X` is `mqtt.X` in `[mqtt]`.
    #[error("{}", .0.to_string().replace("uplink.", "mqtt."))]
    Uplink(#[from] uplink::ConfigError),
    /// The journal could not be opened (nothing was started). Shown with its key, `journal.dir`; the
    /// journal's error names the file or directory and the operation.
    #[error("journal.dir: {0}")]
    Journal(#[from] crate::journal::JournalError),
    /// A thread or listener could not be started.
    #[error("cannot start: {0}")]
    Start(String),
    /// The uplink stopped with an error (the journal keeps everything not acked).
    #[error("uplink: {0}")]
    UplinkFailed(#[from] uplink::UplinkError),
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Patient readings accepted into the journal.
    pub accepted: u64,
    /// Rejected and excluded readings (journaled as events).
    pub rejected: u64,
    /// Edge alert decisions journaled.
    pub alerts: u64,
    /// Readings of unbound devices (journaled as events).
    pub unattributed: u64,
    /// Records the broker PUBACKed (readings and events).
    pub delivered: u64,
    /// Records still in the journal at exit.
    pub journal_depth: u64,
    /// What journal recovery found at start.
    pub recovery: Recovery,
    /// The uplink's own counts.
    pub uplink: UplinkStats,
}

/// The uplink settings a config describes.
pub fn uplink_config(config: &Config, topics: &Topics) -> Result<UplinkConfig, RunError> {
    let raw = &config.raw;
    let gw = &raw.gateway_id;
    let mut u = UplinkConfig::new(
        raw.mqtt.broker.clone(),
        raw.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("phg-{gw}")),
        topics.status(),
    );
    u.mqtt_version = config.mqtt_version;
    u.inflight = raw.mqtt.inflight;
    u.keep_alive = config.keep_alive;
    u.allow_plaintext = raw.mqtt.allow_plaintext;
    u.max_packet_bytes = raw.mqtt.max_packet_bytes;
    u.username = raw.mqtt.username.clone();
    u.password = config.password.clone().map(uplink::Secret::new);
    u.tls = raw.mqtt.tls.as_ref().map(|t| uplink::TlsFiles {
        ca: t.ca.clone(),
        client_cert: t.client_cert.clone(),
        client_key: t.client_key.clone(),
    });
    let online = StatusMessage::online(gw, Some(env!("CARGO_PKG_VERSION")));
    let offline = StatusMessage::offline(gw);
    u.online_payload = serde_json::to_vec(&online).map_err(|e| RunError::Start(e.to_string()))?;
    u.offline_payload = serde_json::to_vec(&offline).map_err(|e| RunError::Start(e.to_string()))?;
    Ok(u)
}

/// The topics a config describes.
pub fn topics(config: &Config) -> Topics {
    match &config.raw.mqtt.topic_root {
        Some(root) => Topics::new(root),
        None => Topics::for_gateway(&config.raw.gateway_id),
    }
}

/// Builds a simulated device from its config section, with its stored records.
pub fn simulated_device(s: &SimulatedSection, now: i64, seed: u64) -> Result<SimDevice, RunError> {
    let start = |e: crate::sources::simulator::SimError| {
        RunError::Start(format!("simulated device {}: {e}", s.id))
    };
    Ok(match s.kind {
        SimKind::Glucometer => {
            let mut cfg = GlucometerConfig::new(s.id.clone());
            cfg.clock_offset_s = s.clock_offset_s;
            if s.unit.as_deref() == Some("mmol/L") {
                cfg.unit = protocol::model::GlucoseUnit::MmolPerL;
            }
            let mut g = SimGlucometer::new(cfg);
            g.generate(s.stored, now, seed).map_err(start)?;
            SimDevice::glucometer(g)
        }
        SimKind::Cuff => {
            let mut cfg = CuffConfig::new(s.id.clone());
            cfg.clock_offset_s = s.clock_offset_s;
            if !s.users.is_empty() {
                cfg.users = s.users.clone();
            }
            let mut c = SimCuff::new(cfg);
            c.generate(s.stored, now, seed).map_err(start)?;
            SimDevice::cuff(c)
        }
    })
}

/// One simulated device's life: a new measurement now and then, a session every `connect_every_s`.
async fn simulated_device_task(
    s: SimulatedSection,
    device: SimDevice,
    pipeline: Pipeline,
    collector_cfg: CollectorConfig,
    heartbeat: Heartbeat,
    live: Arc<crate::status::Live>,
    shutdown: CancellationToken,
) {
    let mut alive = heartbeat.ticker();
    let dref = DeviceRef {
        id: s.id.clone(),
        model: None,
        numbering: Default::default(),
    };
    let mut connect = tokio::time::interval(Duration::from_secs(s.connect_every_s));
    let measure_every = Duration::from_secs(s.measure_every_s.max(1));
    let mut measure =
        tokio::time::interval_at(tokio::time::Instant::now() + measure_every, measure_every);
    // Ticks missed during a session are not made up in a burst: that would store several measurements in
    // the same second, which no real device takes, and a cuff's readings are ordered by their time stamp.
    measure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            // Shutdown first: `select!` otherwise picks a ready branch at random, and after a session longer
            // than `connect_every_s` the interval has a tick ready at once, so a stopping gateway would start
            // new sessions (a cuff's lasts `bp_idle`) with even odds, again and again, before it noticed.
            biased;
            _ = shutdown.cancelled() => break,
            _ = alive.tick() => heartbeat.check_in(),
            _ = measure.tick(), if s.measure_every_s > 0 => {
                n += 1;
                let now = unix_now();
                // A reading taken now (a cuff that is connected indicates it at once).
                let _ = device.with_glucometer(|g| g.measure_random(now, n, &Default::default()));
                let _ = device.with_cuff(|c| c.measure_random(now, n, &Default::default()));
            }
            _ = connect.tick() => {
                let mut link = SimLink::connect(&device);
                let mut sink = pipeline.session();
                let session = async {
                    match s.kind {
                        SimKind::Glucometer => collector::glucose_session(&mut link, &mut sink, &dref, &collector_cfg).await,
                        SimKind::Cuff => collector::blood_pressure_session(&mut link, &mut sink, &dref, &collector_cfg).await,
                    }
                };
                // A session is not interrupted by shutdown mid-transfer: it ends at the device's pace, bounded
                // by the collector's own timers, so every value it handed over is fsynced or refused.
                match session.await {
                    Ok(report) if report.completion == collector::Completion::JournalFull => {
                        tracing::warn!(device = %s.id, "journal full: download stopped; the device keeps its records");
                        pipeline.journal_full_notice(&s.id, unix_now()).await;
                        live.record_session(&s.id, "stopped: journal full");
                    }
                    Ok(report) => {
                        tracing::debug!(device = %s.id, ?report, "session ended");
                        live.record_session(&s.id, "complete");
                    }
                    Err(e) => {
                        tracing::warn!(device = %s.id, error = %e, "session failed; the device keeps its records");
                        live.record_session(&s.id, format!("failed: {e}"));
                    }
                }
                heartbeat.check_in();
                use crate::sources::GattLink;
                link.disconnect().await;
            }
        }
    }
}

/// Journals records that are not part of a device session (alerts of the engine's clock, events about the
/// configuration) and waits for the outcome. Returns how many were accepted.
async fn journal_records(pipeline: &Pipeline, records: Vec<NewRecord>, what: &str) -> usize {
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut accepted = 0;
    for record in records {
        let outcome = match pipeline.writer.submit(record, refused.clone()).await {
            Ok(rx) => rx
                .await
                .unwrap_or(Err(writer::Refusal::Failed("writer stopped".into()))),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(_) => accepted += 1,
            Err(e) => tracing::error!(error = %e, what, "could not journal"),
        }
    }
    accepted
}

/// Advances the edge alert engine's clock: confirmation timeouts (a missing repeat never silences a
/// critical or urgent alert) and unacknowledged escalation at their deadlines, window rules every
/// `every` (the first at once).
async fn alert_tick_task(
    alerts: Arc<EdgeAlerts>,
    pipeline: Pipeline,
    every: Duration,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) {
    let mut window_at = tokio::time::Instant::now();
    let mut not_before = window_at;
    let mut alive = heartbeat.ticker();
    loop {
        let due = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = alive.tick() => {
                heartbeat.check_in();
                continue;
            }
            due = alerts.wait_due(window_at, not_before, unix_now) => due,
        };
        let records = match due {
            Due::Deadline => {
                // At most one deadline pass a second: deadlines are whole seconds, and a burst of old
                // records is handled in one pass.
                not_before = tokio::time::Instant::now() + Duration::from_secs(1);
                alerts.on_deadlines(unix_now())
            }
            Due::Window => {
                window_at = tokio::time::Instant::now() + every;
                alerts.on_tick(unix_now())
            }
        };
        let n = journal_records(&pipeline, records, "alert").await;
        pipeline
            .counters
            .alerts
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The CRM's last applied configuration, kept on disk (`crm-config.json` beside the journal directory,
/// [`crate::config::JournalSection::crm_config_file`]) so that it is in force from the start — before the
/// broker is reachable, and after a restart whatever the broker holds now (issue 11, defect 4: without
/// it a restart attributed readings to the file's bindings although the CRM had replaced them). It is the
/// message exactly as received: loaded, it goes through the same checks as a message from the broker.
#[derive(Debug, Clone)]
pub struct CrmConfigStore {
    path: std::path::PathBuf,
}

impl CrmConfigStore {
    /// The store at `path`.
    pub fn new(path: std::path::PathBuf) -> Self {
        CrmConfigStore { path }
    }

    /// The message kept, or `None` when there is none yet.
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keeps `payload` (durably: see [`state_file::replace`]).
    ///
    /// # Errors
    /// It could not be written; the previous one is still there, whole.
    pub fn save(&self, payload: &[u8]) -> std::io::Result<()> {
        state_file::replace(&self.path, payload)
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Where the CRM's configuration handling stands.
struct RemoteConfig {
    pipeline: Pipeline,
    store: CrmConfigStore,
    /// The version in force, if one from the CRM is.
    in_force: Option<u64>,
    /// `[mqtt] max_config_bytes`.
    max_bytes: usize,
    /// What `gateway status` shows of it.
    live: Arc<crate::status::Live>,
}

impl RemoteConfig {
    /// Applies the kept configuration, if any, before anything is attributed. One that no longer passes
    /// the checks (a newer gateway's rules, a damaged file) leaves the file's bindings in force, loudly.
    fn load_kept(&mut self) {
        match self.store.load() {
            Ok(None) => {}
            Ok(Some(payload)) => {
                match apply_remote_config(&self.pipeline, &payload, None, self.max_bytes) {
                    Ok(v) => {
                        self.in_force = v;
                        self.live.set_config_version(v);
                        tracing::info!(version = ?v, file = %self.store.path().display(), "the CRM's last configuration is in force");
                    }
                    Err((version, reason)) => tracing::error!(
                        ?version,
                        %reason,
                        file = %self.store.path().display(),
                        "the kept CRM configuration does not pass the checks; the configuration file's bindings are in force until the CRM sends one"
                    ),
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                file = %self.store.path().display(),
                "cannot read the kept CRM configuration; the configuration file's bindings are in force until the CRM sends one"
            ),
        }
    }

    /// One message from the configuration topic.
    async fn on_inbound(&mut self, inbound: uplink::Inbound) {
        let payload = match inbound {
            uplink::Inbound::Message(p) => p,
            uplink::Inbound::TooLarge { bytes, max } => {
                let reason = format!(
                    "a message of {bytes} bytes on the configuration topic is over the gateway's \
                     mqtt.max_packet_bytes ({max}) and could not be read"
                );
                self.reject(None, reason).await;
                return;
            }
        };
        match apply_remote_config(&self.pipeline, &payload, self.in_force, self.max_bytes) {
            Ok(Some(version)) => {
                self.in_force = Some(version);
                self.live.set_config_version(Some(version));
                // Kept only once applied: the file always holds a configuration that passed the checks.
                if let Err(e) = self.store.save(&payload) {
                    tracing::error!(error = %e, file = %self.store.path().display(), version, "cannot keep the CRM configuration; after a restart the previous one is in force until the broker sends this one again");
                }
            }
            Ok(None) => {}
            Err((version, reason)) => self.reject(version, reason).await,
        }
    }

    /// Reports a rejected configuration with a `config_rejected` event; the one in force stays.
    async fn reject(&self, version: Option<u64>, reason: String) {
        let pipeline = &self.pipeline;
        tracing::warn!(?version, %reason, "configuration from the CRM rejected; the previous one stays");
        let event = protocol::wire::Event::ConfigRejected { version, reason };
        let payload =
            match protocol::wire::EventMessage::new(&pipeline.gateway_id, unix_now(), event)
                .map_err(|e| e.to_string())
                .and_then(|m| serde_json::to_vec(&m).map_err(|e| e.to_string()))
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the config_rejected event");
                    return;
                }
            };
        let record = NewRecord {
            device: format!("config:{}", pipeline.gateway_id),
            device_seq: None,
            // Named after the event itself (which carries its time): two rejections of the same
            // version are two events, never one taken for a duplicate of the other.
            reading_id: format!(
                "config-rejected:{}",
                uuid::Uuid::new_v5(&protocol::reading_id::NAMESPACE, &payload)
            ),
            topic: pipeline.topics.events(),
            payload,
        };
        journal_records(pipeline, vec![record], "config_rejected event").await;
    }
}

/// Applies the CRM's configuration (`…/config`, retained): a newer version is validated whole — device
/// bindings and every patient's alert settings — applied whole and kept on disk; an invalid one is
/// rejected with a `config_rejected` event and the configuration in force stays. The same version again
/// (the retained message after a reconnect) is ignored.
async fn remote_config_task(
    mut rx: tokio::sync::mpsc::Receiver<uplink::Inbound>,
    mut remote: RemoteConfig,
    shutdown: CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = rx.recv() => match p { Some(p) => p, None => break },
        };
        remote.on_inbound(inbound).await;
    }
}

/// Why a configuration message does not parse, naming the key (a JSON path) and never the value: a
/// refused value may be a name.
fn config_parse_reason(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = e.inner();
    let path = e.path().to_string();
    let what = match inner.classify() {
        serde_json::error::Category::Syntax => "is not valid JSON".to_owned(),
        serde_json::error::Category::Eof => "ends early (truncated JSON)".to_owned(),
        serde_json::error::Category::Io => "could not be read".to_owned(),
        serde_json::error::Category::Data => {
            let msg = inner.to_string();
            // serde's messages for these name keys only; the others may quote the value.
            if msg.starts_with("missing field") || msg.starts_with("unknown field") {
                msg.split(" at line").next().unwrap_or_default().to_owned()
            } else {
                "has a value of the wrong type or out of range".to_owned()
            }
        }
    };
    if path == "." {
        format!("not a valid configuration message: {what}")
    } else {
        format!("not a valid configuration message: `{path}` {what}")
    }
}

/// Checks one configuration message from the CRM (`…/config`) without applying anything: its size
/// against `max_bytes` (`mqtt.max_config_bytes`), the JSON, the schema, the version against the one in
/// force (`in_force`), every device binding and patient id. `Ok(None)`: the version in force again,
/// nothing to do; `Ok(Some((msg, bindings)))`: valid, to be applied whole; `Err((version, reason))`:
/// rejected (`version` when it could be read at all). A reason names the key and why, never the value.
/// Public so the fuzz target `crm_config` runs exactly what the gateway runs on an MQTT payload. The
/// patients' alert settings are checked against the rules when applied ([`EdgeAlerts::set_patients`]).
///
/// # Errors
/// `(version, reason)`: why the message is refused.
#[allow(clippy::type_complexity)]
pub fn check_remote_config(
    payload: &[u8],
    in_force: Option<u64>,
    max_bytes: usize,
) -> Result<Option<(protocol::wire::ConfigMessage, Bindings)>, (Option<u64>, String)> {
    use protocol::wire::{CONFIG_SCHEMA, CONFIG_SCHEMA_V1, ConfigMessage};
    // The version first, so a rejection can name it even when the rest does not parse.
    let value = serde_json::from_slice::<serde_json::Value>(payload).ok();
    let version = value
        .as_ref()
        .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
    // The schema before the fields: a newer CRM's message is refused for what it is, not for a field
    // this gateway does not know.
    if let Some(schema) = value
        .as_ref()
        .and_then(|v| v.get("schema").and_then(serde_json::Value::as_str))
        && schema != CONFIG_SCHEMA
        && schema != CONFIG_SCHEMA_V1
    {
        return Err((
            version,
            format!(
                "`schema` is not one this gateway reads ({CONFIG_SCHEMA_V1} or {CONFIG_SCHEMA}); \
                 update the gateway or send {CONFIG_SCHEMA}"
            ),
        ));
    }
    if payload.len() > max_bytes {
        return Err((
            version,
            format!(
                "the message is {} bytes, over the gateway's mqtt.max_config_bytes ({max_bytes})",
                payload.len()
            ),
        ));
    }
    let msg: ConfigMessage =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(payload))
            .map_err(|e| (version, config_parse_reason(&e)))?;
    let version = Some(msg.version);
    if msg.schema != CONFIG_SCHEMA && msg.schema != CONFIG_SCHEMA_V1 {
        return Err((
            version,
            format!("`schema` is not {CONFIG_SCHEMA_V1} or {CONFIG_SCHEMA}"),
        ));
    }
    if msg.schema == CONFIG_SCHEMA_V1 && !msg.cards.is_empty() {
        return Err((version, format!("`cards` needs `schema` {CONFIG_SCHEMA}")));
    }
    match in_force {
        Some(v) if msg.version == v => return Ok(None),
        Some(v) if msg.version < v => {
            return Err((
                version,
                format!("version {} is older than version {v} in force", msg.version),
            ));
        }
        _ => {}
    }
    crate::config::check_bindings(
        msg.bindings
            .iter()
            .map(|b| (b.device.as_str(), b.user_id, b.patient.as_str())),
    )
    .map_err(|(key, why)| (version, format!("{key} {why}")))?;
    let mut bindings = Bindings::default();
    for b in &msg.bindings {
        bindings.bind(&b.device, b.user_id, &b.patient);
    }
    for (i, p) in msg.patients.iter().enumerate() {
        if !protocol::wire::is_valid_pseudonym(&p.patient) {
            return Err((
                version,
                format!("patients[{i}].patient is not a pseudonymous id"),
            ));
        }
    }
    let mut cards = std::collections::HashSet::new();
    for (i, c) in msg.cards.iter().enumerate() {
        if !crate::kiosk::card::is_card_hash(&c.card) {
            return Err((
                version,
                format!(
                    "cards[{i}].card is not a card hash (HMAC-SHA256, 64 lower-case hex digits; \
                     `gateway kiosk card-hash` computes it): never send a card's UID"
                ),
            ));
        }
        if !protocol::wire::is_valid_pseudonym(&c.patient) {
            return Err((
                version,
                format!("cards[{i}].patient is not a pseudonymous id"),
            ));
        }
        if !cards.insert(c.card.as_str()) {
            return Err((version, format!("cards[{i}].card is listed twice")));
        }
    }
    Ok(Some((msg, bindings)))
}

/// Checks ([`check_remote_config`]) and applies one configuration message. `Ok(Some(v))`: version `v`
/// is now in force; `Ok(None)`: the version in force again, nothing to do; `Err((version, reason))`:
/// rejected.
fn apply_remote_config(
    pipeline: &Pipeline,
    payload: &[u8],
    in_force: Option<u64>,
    max_bytes: usize,
) -> Result<Option<u64>, (Option<u64>, String)> {
    let Some((msg, bindings)) = check_remote_config(payload, in_force, max_bytes)? else {
        return Ok(None);
    };
    let version = Some(msg.version);
    if let Some(alerts) = &pipeline.alerts {
        alerts
            .set_patients(&msg.patients)
            .map_err(|e| (version, format!("patients: {e}")))?;
    }
    let (n_bindings, n_patients) = (msg.bindings.len(), msg.patients.len());
    pipeline.bindings.replace_with(bindings);
    if let Some(kiosk) = pipeline.bindings.kiosk() {
        kiosk.set_cards(
            msg.cards
                .iter()
                .map(|c| (c.card.clone(), c.patient.clone()))
                .collect(),
        );
    }
    tracing::info!(
        version = msg.version,
        bindings = n_bindings,
        patients = n_patients,
        "configuration from the CRM applied"
    );
    Ok(Some(msg.version))
}

/// Renders the retained online status afresh: version, journal depth, and with Bluetooth on the adapter
/// and every paired device's last read and last failure (stage, cause, RSSI).
fn status_source(
    config: &Config,
    journal: Arc<Mutex<Journal>>,
    ble_status: crate::sources::ble::BleStatusHandle,
) -> uplink::StatusSource {
    let gateway_id = config.raw.gateway_id.clone();
    let store = config
        .raw
        .ble
        .as_ref()
        .map(|b| crate::sources::ble::store::DeviceStore::new(b.to_ble_config().store_dir));
    let last_depth = Arc::new(std::sync::atomic::AtomicU64::new(0));
    uplink::StatusSource(Arc::new(move || {
        let mut msg = StatusMessage::online(&gateway_id, Some(env!("CARGO_PKG_VERSION")));
        // The uplink's own task calls this: never wait for a journal lock held through an fdatasync.
        if let Ok(j) = journal.try_lock() {
            last_depth.store(j.depth(), Ordering::Relaxed);
        }
        msg.journal_depth = Some(last_depth.load(Ordering::Relaxed));
        if let Some(store) = &store {
            match store.devices() {
                Ok(devices) => ble_status.snapshot().fill_status(&mut msg, &devices),
                Err(e) => tracing::warn!(error = %e, "status: cannot read the paired devices"),
            }
        }
        serde_json::to_vec(&msg).unwrap_or_else(|_| br#"{"state":"online"}"#.to_vec())
    }))
}

/// Tells systemd (`NOTIFY_SOCKET`; nothing without one) how the service stands.
fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Runs the gateway until `shutdown` is cancelled.
///
/// # Errors
/// [`RunError`]: at start (nothing started), or the uplink's fatal error.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<RunSummary, RunError> {
    run_with(config, shutdown, RunHooks::default()).await
}

/// What a caller inside the process (the demo, tests) gets of a running gateway.
#[derive(Debug, Default)]
pub struct RunHooks {
    /// Receives the kiosk once it is up (with `[kiosk]`) and the address its pages are served on: the
    /// demo's simulated staff drive it as the staff page would.
    pub kiosk:
        Option<tokio::sync::oneshot::Sender<(Arc<crate::kiosk::Kiosk>, std::net::SocketAddr)>>,
    /// Simulated devices the caller keeps a handle on (it takes their measurements), run like the
    /// configuration's `[[simulated]]` ones.
    pub simulated: Vec<(SimulatedSection, SimDevice)>,
}

/// [`run`], handing `hooks` what they ask for.
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    mut hooks: RunHooks,
) -> Result<RunSummary, RunError> {
    let topics = topics(&config);
    // systemd's watchdog (WATCHDOG_USEC), if it runs one: every long-lived task checks in to `liveness`.
    let watchdog = sd_notify::watchdog_enabled();
    let liveness = Liveness::new(watchdog);
    let live = Arc::new(crate::status::Live::default());
    // Everything that can be checked is checked before anything starts.
    let (config_tx, config_rx) = tokio::sync::mpsc::channel(4);
    let mut uplink_cfg = uplink_config(&config, &topics)?;
    uplink_cfg.config_topic = Some(topics.config());
    uplink_cfg.inbound = Some(config_tx);
    let mut uplink_cfg = uplink_cfg.validate()?;
    let raw = &config.raw;
    let alerts = match &config.alert_rules {
        Some(rules) => Some(Arc::new(
            EdgeAlerts::open(
                rules.clone(),
                Vec::new(),
                &raw.gateway_id,
                topics.clone(),
                &raw.alerts.state_file(&raw.journal.dir),
            )
            .map_err(|e| RunError::Start(e.to_string()))?,
        )),
        None => None,
    };
    let mut jcfg = JournalConfig::new(raw.journal.dir.clone());
    jcfg.max_bytes = raw.journal.max_bytes;
    jcfg.max_records = raw.journal.max_records;
    // The journal keeps what the edge alerts' snapshot does not include yet, for the replay below.
    let keep = alerts.as_ref().and_then(|a| a.keep_after());
    let (mut journal, recovery) = match keep {
        Some(keep) => Journal::open_keeping(jcfg, keep)?,
        None => Journal::open(jcfg)?,
    };
    let kept = journal.take_replay();
    if recovery.is_clean() {
        tracing::info!(pending = recovery.records, "journal opened");
    } else {
        tracing::warn!(
            pending = recovery.records,
            torn_bytes = recovery.torn_bytes,
            corrupt_frames = recovery.corrupt_frames,
            missing_records = recovery.missing_records,
            "journal recovered from damage"
        );
    }
    let journal = Arc::new(Mutex::new(journal));
    let ble_status = crate::sources::ble::BleStatusHandle::default();
    uplink_cfg.status_source = Some(status_source(&config, journal.clone(), ble_status.clone()));
    uplink_cfg.heartbeat = Some(liveness.register("uplink"));
    uplink_cfg.link_state = Some(live.link.clone());
    let appended = Arc::new(Handoff::default());
    let (writer, writer_thread) = writer::spawn_with_heartbeat(
        journal.clone(),
        appended.clone(),
        1024,
        Some(liveness.register("journal writer")),
    )
    .map_err(|e| RunError::Start(e.to_string()))?;
    let mut bindings = Bindings::default();
    for b in &raw.bindings {
        bindings.bind(&b.device, b.user_id, &b.patient);
    }
    // Devices paired through `gateway pair` carry their own patient bindings (the allow-list).
    if let Some(ble) = &raw.ble {
        match crate::sources::ble::store::DeviceStore::new(ble.state_dir.clone()).devices() {
            Ok(devices) => crate::sources::ble::bindings_of(&devices, &mut bindings),
            Err(e) => tracing::error!(error = %e, "cannot read the paired-device store"),
        }
    }
    let counters = Arc::new(Counters::default());
    let pipeline = Pipeline {
        gateway_id: raw.gateway_id.clone(),
        topics: topics.clone(),
        bindings: Arc::new(bindings),
        journal: journal.clone(),
        writer,
        counters: counters.clone(),
        alerts: alerts.clone(),
    };
    // The kiosk before the CRM's configuration is loaded (it carries the card map).
    let kiosk = match (&raw.kiosk, &config.kiosk) {
        (Some(section), Some(checked)) => {
            let kiosk = Arc::new(
                crate::kiosk::Kiosk::open(crate::kiosk::KioskSettings {
                    devices: section.devices.clone(),
                    idle_timeout: Duration::from_secs(section.idle_timeout_s),
                    hold_file: section.hold_file(&raw.journal.dir),
                    max_held: section.max_held,
                    card_key: checked.card_key.clone(),
                })
                .map_err(|e| RunError::Start(e.to_string()))?,
            );
            pipeline.bindings.set_kiosk(Some(kiosk.clone()));
            kiosk.attach(pipeline.clone());
            kiosk.attach_ble(ble_status.clone());
            uplink_cfg.connected_flag = Some(kiosk.broker_flag());
            let listener = tokio::net::TcpListener::bind(section.listen)
                .await
                .map_err(|e| RunError::Start(format!("kiosk.listen {}: {e}", section.listen)))?;
            let addr = listener
                .local_addr()
                .map_err(|e| RunError::Start(format!("kiosk.listen: {e}")))?;
            tracing::info!(%addr, "kiosk pages: patient at /, staff at /staff");
            if let Some(tx) = hooks.kiosk.take() {
                let _ = tx.send((kiosk.clone(), addr));
            }
            Some((kiosk, listener, checked.staff.clone(), section.clone()))
        }
        _ => None,
    };
    // The CRM's last configuration before any device is read: the file's bindings are only the start.
    let mut remote = RemoteConfig {
        pipeline: pipeline.clone(),
        store: CrmConfigStore::new(raw.journal.crm_config_file()),
        in_force: None,
        max_bytes: raw.mqtt.max_config_bytes as usize,
        live: live.clone(),
    };
    remote.load_kept();
    // With the CRM's patient settings in force, the readings accepted after the edge alerts' last
    // snapshot (a power cut, a crash) are evaluated again, before any new one.
    if let Some(a) = &alerts {
        let records = a.replay(&kept, unix_now());
        let n = journal_records(&pipeline, records, "alert").await;
        counters.alerts.fetch_add(n as u64, Ordering::Relaxed);
    }
    drop(kept);

    let uplink_stop = CancellationToken::new();
    let uplink_task = tokio::spawn(uplink::run_checked(
        uplink_cfg,
        journal.clone(),
        appended.clone(),
        uplink_stop.clone(),
    ));
    let telemetry = crate::telemetry::spawn_exporter(
        &config,
        journal.clone(),
        counters.clone(),
        shutdown.clone(),
    );

    let devices = TaskTracker::new();
    let collector_cfg = CollectorConfig {
        bp_idle: Duration::from_secs(2),
        ..CollectorConfig::default()
    };
    // The configuration's simulated devices, then those a caller (the demo) keeps handles on.
    let configured = raw
        .simulated
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((s.clone(), simulated_device(s, unix_now(), i as u64 + 1)?)))
        .collect::<Result<Vec<_>, RunError>>()?;
    for (s, device) in configured
        .into_iter()
        .chain(std::mem::take(&mut hooks.simulated))
    {
        let heartbeat = liveness.register(format!("source {}", s.id));
        devices.spawn(simulated_device_task(
            s,
            device,
            pipeline.clone(),
            collector_cfg,
            heartbeat,
            live.clone(),
            shutdown.clone(),
        ));
    }
    devices.spawn(remote_config_task(config_rx, remote, shutdown.clone()));
    let alerts_at_exit = alerts.clone();
    if let Some(a) = alerts.clone() {
        devices.spawn(alert_tick_task(
            a,
            pipeline.clone(),
            Duration::from_secs(raw.alerts.tick_s),
            liveness.register("edge alerts"),
            shutdown.clone(),
        ));
    }
    if let Some(ble) = &raw.ble {
        let mut ble_cfg = ble.to_ble_config();
        ble_cfg.heartbeat = Some(liveness.register("ble source"));
        devices.spawn(crate::sources::ble::run(
            ble_cfg,
            pipeline.clone(),
            ble_status.clone(),
            shutdown.clone(),
        ));
    }
    let kiosk = match kiosk {
        Some((kiosk, listener, staff, section)) => {
            devices.spawn(kiosk.clone().run_idle(shutdown.clone()));
            {
                let (kiosk, shutdown) = (kiosk.clone(), shutdown.clone());
                devices.spawn(async move {
                    if let Err(e) = crate::kiosk::web::serve(listener, kiosk, staff, shutdown).await
                    {
                        tracing::error!(error = %e, "kiosk web server stopped");
                    }
                });
            }
            if let Some(path) = &section.reader {
                let mut cfg = crate::sources::card_reader::Config::new(path.clone());
                cfg.baud = section.baud;
                devices.spawn(crate::kiosk::state::card_reader_task(
                    kiosk.clone(),
                    cfg,
                    shutdown.clone(),
                ));
            }
            Some(kiosk)
        }
        None => None,
    };
    devices.close();
    let status_server = crate::status::serve(
        &config,
        crate::status::Sources {
            journal: journal.clone(),
            live: live.clone(),
            liveness: liveness.clone(),
            ble_status: ble_status.clone(),
            alerts,
        },
        shutdown.clone(),
    );

    // The journal is recovered, the uplink and the sources run.
    notify_systemd(sd_notify::NotifyState::Ready);
    let watchdog_stop = CancellationToken::new();
    if let Some(interval) = watchdog {
        tokio::spawn(liveness.clone().watchdog(interval, watchdog_stop.clone()));
    }

    shutdown.cancelled().await;
    // Then the bounded wait below: sessions end at their deadline, the uplink waits at most its
    // shutdown grace for PUBACKs (TimeoutStopSec= in the unit allows for both).
    notify_systemd(sd_notify::NotifyState::Stopping);
    watchdog_stop.cancel();
    // It ends on `shutdown` by itself and removes its socket: `gateway status` then says "not running".
    if let Some(s) = status_server {
        let _ = s.await;
    }
    tracing::info!("shutting down: finishing device sessions");
    devices.wait().await;
    // The kiosk and the pipeline refer to each other: let go, so the writer handle can be dropped.
    if let Some(kiosk) = kiosk {
        kiosk.detach();
        pipeline.bindings.set_kiosk(None);
    }
    if let Some(a) = &alerts_at_exit {
        // Readings still settling in the background journal their alerts through `pipeline`; the
        // state is saved as it stands now (what comes later is in the journal, for the replay).
        a.flush();
    }
    // Dropping the last writer handle ends the writer thread after its queue is committed.
    drop(pipeline);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    uplink_stop.cancel();
    let uplink = match uplink_task.await {
        Ok(r) => r?,
        Err(e) => return Err(RunError::Start(format!("uplink task: {e}"))),
    };
    if let Some(t) = telemetry {
        t.abort();
    }
    let journal_depth = journal.lock().unwrap_or_else(|p| p.into_inner()).depth();
    Ok(RunSummary {
        accepted: counters.accepted.load(Ordering::Relaxed),
        rejected: counters.rejected.load(Ordering::Relaxed),
        unattributed: counters.unattributed.load(Ordering::Relaxed),
        alerts: counters.alerts.load(Ordering::Relaxed),
        delivered: uplink.delivered,
        journal_depth,
        recovery,
        uplink,
    })
}
