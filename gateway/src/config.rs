//! `gateway run --config FILE`: the TOML configuration, checked before anything starts.
//!
//! Two layers (ripgrep's low/high split, STYLE.md practice 14): [`RawConfig`] is what the file says, with
//! `deny_unknown_fields` everywhere so a misspelt key is an error naming the key and its line; [`Config`]
//! is the checked result. Every field is documented in `gateway/config.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::uplink::MqttVersion;

/// Why a configuration cannot be used. Nothing has been started when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown / missing / mistyped key (the message names it and
    /// its line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker: String,
    /// Protocol version: "5" (default) or "3.1.1".
    #[serde(default = "default_version")]
    pub version: String,
    /// Client id; default `phg-{gateway_id}`.
    pub client_id: Option<String>,
    /// Topic root; default `phg/v1/{gateway_id}`.
    pub topic_root: Option<String>,
    /// QoS 1 messages in flight at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Keep-alive, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Allow `mqtt://` (no TLS) to a host that is not loopback.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// User name.
    pub username: Option<String>,
    /// Password file (its first line; keeps the secret out of the config).
    pub password_file: Option<PathBuf>,
    /// `[mqtt.tls]`.
    pub tls: Option<TlsSection>,
    /// The largest MQTT packet taken from the broker, bytes (announced in the MQTT 5 CONNECT).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: u32,
    /// The largest configuration message from the CRM applied, bytes; a larger one is rejected with a
    /// `config_rejected` event.
    #[serde(default = "default_max_config_bytes")]
    pub max_config_bytes: u32,
}

const fn default_max_packet_bytes() -> u32 {
    crate::uplink::DEFAULT_MAX_PACKET_BYTES
}

const fn default_max_config_bytes() -> u32 {
    DEFAULT_MAX_CONFIG_BYTES
}

/// The default of `[mqtt] max_config_bytes`: 256 KiB, about a thousand patients' bindings and settings.
pub const DEFAULT_MAX_CONFIG_BYTES: u32 = 256 * 1024;
/// Room `max_packet_bytes` must leave above `max_config_bytes` for the PUBLISH's topic and properties,
/// so that a configuration just over the limit still arrives and is rejected visibly.
pub const CONFIG_PACKET_MARGIN: u32 = 4 * 1024;
/// The most records a `[[simulated]]` device may hold at start: a GLS sequence number is 16 bits
/// (GATT.md), and a larger store would take memory for nothing.
pub const MAX_SIMULATED_STORED: usize = 65_535;

fn default_version() -> String {
    "5".to_owned()
}

const fn default_inflight() -> u16 {
    100
}

const fn default_keep_alive() -> u64 {
    30
}

/// `[mqtt.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate(s), PEM.
    pub ca: PathBuf,
    /// Client certificate, PEM (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// Client key, PEM.
    pub client_key: Option<PathBuf>,
}

/// `[journal]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSection {
    /// Directory (created 0700).
    pub dir: PathBuf,
    /// Bound on pending bytes; when reached the gateway stops downloading (devices keep their records).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Bound on pending records.
    #[serde(default = "default_max_records")]
    pub max_records: u64,
}

const fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}

const fn default_max_records() -> u64 {
    1_000_000
}

impl JournalSection {
    /// Where the CRM's last applied configuration is kept (`crm-config.json` beside the journal
    /// directory, like the alert state): loaded at start before any reading is attributed.
    pub fn crm_config_file(&self) -> PathBuf {
        self.dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("crm-config.json")
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// Log lines as JSON (for journald / a log shipper) instead of text.
    #[serde(default)]
    pub json_logs: bool,
    /// Serve Prometheus metrics on this address (e.g. "127.0.0.1:9464"); off when absent.
    pub metrics_listen: Option<SocketAddr>,
}

/// `[status]`: what `gateway status` asks and when it calls the gateway unhealthy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusSection {
    /// The status socket; absent: `gateway.sock` beside the journal directory (the service's state
    /// directory). Created mode 0660: the service's group may ask.
    pub socket: Option<PathBuf>,
    /// Unhealthy when the broker has been unreachable this long, seconds, with readings waiting.
    #[serde(default = "default_broker_down_s")]
    pub broker_down_s: u64,
}

impl Default for StatusSection {
    fn default() -> Self {
        StatusSection {
            socket: None,
            broker_down_s: default_broker_down_s(),
        }
    }
}

impl StatusSection {
    /// The socket: as configured, or `gateway.sock` in the journal directory's parent.
    pub fn socket_path(&self, journal_dir: &Path) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| {
            journal_dir
                .parent()
                .unwrap_or(Path::new("."))
                .join("gateway.sock")
        })
    }
}

const fn default_broker_down_s() -> u64 {
    300
}

/// `[alerts]`: the edge alert engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// Evaluate accepted readings at the edge and publish alerts on `…/alerts` (default on).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A rule file (TOML, the format of `protocol`'s default rules); absent: the built-in CLINICAL.md rules.
    pub rules_file: Option<PathBuf>,
    /// How often the window rules (7-day average, trend, adherence) run, seconds. Confirmation timeouts
    /// and unacknowledged escalation do not wait for it: they fire at their deadlines.
    #[serde(default = "default_tick_s")]
    pub tick_s: u64,
    /// Where the engine keeps its state (open episodes, pending confirmations, the readings window rules
    /// look back on) across restarts; absent: `edge-alerts.json` beside the journal directory.
    pub state_file: Option<PathBuf>,
}

impl Default for AlertsSection {
    fn default() -> Self {
        AlertsSection {
            enabled: true,
            rules_file: None,
            tick_s: default_tick_s(),
            state_file: None,
        }
    }
}

impl AlertsSection {
    /// The state file: as configured, or `edge-alerts.json` in the journal directory's parent (not in the
    /// journal directory, which holds the journal's files only).
    pub fn state_file(&self, journal_dir: &std::path::Path) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            journal_dir
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("edge-alerts.json")
        })
    }
}

const fn default_true() -> bool {
    true
}

const fn default_tick_s() -> u64 {
    60
}

/// `[[bindings]]`: a device (or one user of a multi-user cuff) → a pseudonymous patient id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSection {
    /// Device id (the Bluetooth address, or a simulated device's id).
    pub device: String,
    /// BLS user id, for a cuff with several users; absent = every user.
    pub user_id: Option<u8>,
    /// Pseudonymous patient id — never a name or a national id.
    pub patient: String,
}

/// Kind of simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimKind {
    /// A GLS glucometer with RACP.
    Glucometer,
    /// A BLS cuff.
    Cuff,
}

/// `[[simulated]]`: a device served by the in-process simulator, so a gateway can be exercised without a
/// radio.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedSection {
    /// Glucometer or cuff.
    pub kind: SimKind,
    /// Device id.
    pub id: String,
    /// Records stored in the device at start.
    #[serde(default)]
    pub stored: usize,
    /// A new measurement every this many seconds (0 = none).
    #[serde(default)]
    pub measure_every_s: u64,
    /// Reconnect (a new session) every this many seconds.
    #[serde(default = "default_connect_every")]
    pub connect_every_s: u64,
    /// Device clock minus real time, seconds.
    #[serde(default)]
    pub clock_offset_s: i64,
    /// Glucometer unit: "mg/dL" (default) or "mmol/L".
    pub unit: Option<String>,
    /// Cuff users (BLS user ids).
    #[serde(default)]
    pub users: Vec<u8>,
}

const fn default_connect_every() -> u64 {
    10
}

/// `[ble]`: real Bluetooth LE devices through BlueZ (absent: no radio is used).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BleSection {
    /// The adapter, by name (`hci0`) or address; default the first one BlueZ lists.
    pub adapter: Option<String>,
    /// Where the paired-device allow-list and the device status live (`gateway pair` writes here).
    pub state_dir: PathBuf,
    /// Sessions at once.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// A session's overall deadline, seconds (a wedged bluetoothd must not hang the gateway).
    #[serde(default = "default_session_deadline")]
    pub session_deadline_s: u64,
    /// First retry after a failed session, seconds; doubles per failure up to `retry_max_s`.
    #[serde(default = "default_retry_base")]
    pub retry_base_s: u64,
    /// Longest retry backoff, seconds.
    #[serde(default = "default_retry_max")]
    pub retry_max_s: u64,
    /// After a complete session, leave the device alone this long, seconds.
    #[serde(default = "default_revisit")]
    pub revisit_after_s: u64,
    /// Set a device's clock (Current Time) after a download when it is off by more than this many
    /// seconds; absent: never write a device clock (readings always carry the measured offset).
    pub set_clock_above_s: Option<u64>,
    /// The zone the devices display, minutes east of UTC (default 0).
    #[serde(default)]
    pub device_zone_offset_min: i32,
}

const fn default_max_sessions() -> usize {
    2
}

const fn default_session_deadline() -> u64 {
    180
}

const fn default_retry_base() -> u64 {
    5
}

const fn default_retry_max() -> u64 {
    600
}

const fn default_revisit() -> u64 {
    300
}

impl BleSection {
    /// The BLE source's settings.
    pub fn to_ble_config(&self) -> crate::sources::ble::BleConfig {
        let mut c = crate::sources::ble::BleConfig::new(self.state_dir.clone());
        c.adapter.clone_from(&self.adapter);
        c.max_sessions = self.max_sessions;
        c.session_deadline = Duration::from_secs(self.session_deadline_s);
        c.retry_base = Duration::from_secs(self.retry_base_s);
        c.retry_max = Duration::from_secs(self.retry_max_s);
        c.revisit_after = Duration::from_secs(self.revisit_after_s);
        c.clock_set_above = self.set_clock_above_s.map(Duration::from_secs);
        c.device_zone_offset_min = self.device_zone_offset_min;
        c
    }
}

/// `[kiosk]`: a clinic kiosk with shared devices (docs/kiosk.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KioskSection {
    /// The patient and staff pages' address; loopback by default (a kiosk browser on the same machine).
    #[serde(default = "default_kiosk_listen")]
    pub listen: SocketAddr,
    /// The shared kiosk devices (device ids): their readings go to the checked-in patient, not to a binding.
    pub devices: Vec<String>,
    /// A session ends after this long without activity, seconds.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_s: u64,
    /// Where held (unattributed) readings are kept; absent: `kiosk-hold.json` beside the journal directory.
    pub hold_file: Option<PathBuf>,
    /// At most this many readings held; when full a new unattributed kiosk reading is not taken from the
    /// device (it keeps it, as with a full journal) until staff assign or discard some.
    #[serde(default = "default_max_held")]
    pub max_held: usize,
    /// The card reader board's serial port (absent: check-in by staff only).
    pub reader: Option<PathBuf>,
    /// Its baud rate.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// The per-deployment card key, hex (at least 32 bytes); or `card_key_file`.
    pub card_key: Option<String>,
    /// A file whose first line is the card key, hex.
    pub card_key_file: Option<PathBuf>,
    /// `[[kiosk.staff]]`: staff tokens.
    #[serde(default)]
    pub staff: Vec<StaffSection>,
}

/// `[[kiosk.staff]]`: a staff token and the id audit events name it by.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaffSection {
    /// The id in audit events (a desk or a role, never a person's name): letters, digits, `._-`.
    pub id: String,
    /// The token (at least 32 characters); or `token_file`.
    pub token: Option<String>,
    /// A file whose first line is the token.
    pub token_file: Option<PathBuf>,
}

fn default_kiosk_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8088))
}

const fn default_idle_timeout() -> u64 {
    180
}

const fn default_max_held() -> usize {
    1000
}

/// The largest `[kiosk] max_held` accepted: the hold file is rewritten whole on each change, and staff
/// cannot work through more on one page.
pub const MAX_HELD_LIMIT: usize = 10_000;

const fn default_baud() -> u32 {
    115_200
}

/// The shortest staff token accepted, characters.
pub const MIN_STAFF_TOKEN: usize = 32;

impl KioskSection {
    /// The held-readings file: as configured, or `kiosk-hold.json` beside the journal directory.
    pub fn hold_file(&self, journal_dir: &Path) -> PathBuf {
        self.hold_file.clone().unwrap_or_else(|| {
            journal_dir
                .parent()
                .unwrap_or(Path::new("."))
                .join("kiosk-hold.json")
        })
    }
}

/// `[kiosk]` checked: the secrets read from their files.
#[derive(Debug, Clone)]
pub struct KioskConfig {
    /// The card key, if cards are used.
    pub card_key: Option<crate::kiosk::card::CardKey>,
    /// The staff tokens.
    pub staff: Vec<crate::kiosk::StaffToken>,
}

/// The file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This gateway's id (a topic level: letters, digits, `-`, `_`, `.`).
    pub gateway_id: String,
    /// `[mqtt]`.
    pub mqtt: MqttSection,
    /// `[journal]`.
    pub journal: JournalSection,
    /// `[telemetry]`.
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// `[alerts]`.
    #[serde(default)]
    pub alerts: AlertsSection,
    /// `[status]`.
    #[serde(default)]
    pub status: StatusSection,
    /// `[[bindings]]`.
    #[serde(default)]
    pub bindings: Vec<BindingSection>,
    /// `[[simulated]]`.
    #[serde(default)]
    pub simulated: Vec<SimulatedSection>,
    /// `[ble]`.
    pub ble: Option<BleSection>,
    /// `[kiosk]`.
    pub kiosk: Option<KioskSection>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// As written, every value checked.
    pub raw: RawConfig,
    /// The MQTT version `mqtt.version` names.
    pub mqtt_version: MqttVersion,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// The MQTT password, read from `password_file`.
    pub password: Option<String>,
    /// The edge alert rules (`[alerts]`), loaded and validated; `None` when alerts are off.
    pub alert_rules: Option<protocol::rules::RuleSet>,
    /// `[kiosk]`'s secrets, read and checked; `None` without a kiosk.
    pub kiosk: Option<KioskConfig>,
}

impl Config {
    /// Reads and checks a file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and what is wrong.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks TOML text (`path` is for messages).
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if !protocol::wire::is_valid_topic_level(&raw.gateway_id) {
            return Err(invalid(
                "gateway_id",
                "must be a non-empty MQTT topic level (no '/', '+', '#')",
            ));
        }
        let b = &raw.mqtt.broker;
        if !(b.starts_with("mqtt://") || b.starts_with("mqtts://")) {
            return Err(invalid(
                "mqtt.broker",
                "must start with mqtt:// or mqtts://",
            ));
        }
        let mqtt_version = match raw.mqtt.version.as_str() {
            "5" => MqttVersion::V5,
            "3.1.1" => MqttVersion::V311,
            _ => return Err(invalid("mqtt.version", "must be \"5\" or \"3.1.1\"")),
        };
        if raw.mqtt.inflight == 0 {
            return Err(invalid("mqtt.inflight", "must be at least 1"));
        }
        if raw.mqtt.keep_alive_s < 5 {
            return Err(invalid("mqtt.keep_alive_s", "must be at least 5 seconds"));
        }
        if raw.mqtt.max_config_bytes < 1024 {
            return Err(invalid("mqtt.max_config_bytes", "must be at least 1024"));
        }
        if raw.mqtt.max_packet_bytes < crate::uplink::MIN_MAX_PACKET_BYTES
            || raw.mqtt.max_packet_bytes
                < raw
                    .mqtt
                    .max_config_bytes
                    .saturating_add(CONFIG_PACKET_MARGIN)
        {
            return Err(invalid(
                "mqtt.max_packet_bytes",
                &format!(
                    "must be at least {} and at least max_config_bytes + {CONFIG_PACKET_MARGIN}",
                    crate::uplink::MIN_MAX_PACKET_BYTES
                ),
            ));
        }
        if let Some(tls) = &raw.mqtt.tls
            && tls.client_cert.is_some() != tls.client_key.is_some()
        {
            return Err(invalid(
                "mqtt.tls",
                "client_cert and client_key go together",
            ));
        }
        if raw.journal.max_bytes < 64 * 1024 {
            return Err(invalid("journal.max_bytes", "must be at least 65536"));
        }
        if raw.journal.max_records == 0 {
            return Err(invalid("journal.max_records", "must be at least 1"));
        }
        let bindings = raw
            .bindings
            .iter()
            .map(|b| (b.device.as_str(), b.user_id, b.patient.as_str()));
        if let Err((key, reason)) = check_bindings(bindings) {
            return Err(invalid(&key, &reason));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, s) in raw.simulated.iter().enumerate() {
            if s.id.is_empty() || !ids.insert(s.id.clone()) {
                return Err(invalid(
                    &format!("simulated[{i}].id"),
                    "must be non-empty and unique",
                ));
            }
            if let Some(u) = &s.unit
                && u != "mg/dL"
                && u != "mmol/L"
            {
                return Err(invalid(
                    &format!("simulated[{i}].unit"),
                    "must be \"mg/dL\" or \"mmol/L\"",
                ));
            }
            if s.stored > MAX_SIMULATED_STORED {
                return Err(invalid(
                    &format!("simulated[{i}].stored"),
                    &format!("must be at most {MAX_SIMULATED_STORED}"),
                ));
            }
            if s.connect_every_s == 0 {
                return Err(invalid(
                    &format!("simulated[{i}].connect_every_s"),
                    "must be at least 1",
                ));
            }
        }
        if let Some(ble) = &raw.ble {
            if ble.max_sessions == 0 {
                return Err(invalid("ble.max_sessions", "must be at least 1"));
            }
            if ble.session_deadline_s < 10 {
                return Err(invalid(
                    "ble.session_deadline_s",
                    "must be at least 10 seconds",
                ));
            }
            if ble.retry_base_s == 0 || ble.retry_max_s < ble.retry_base_s {
                return Err(invalid(
                    "ble.retry_base_s",
                    "must be at least 1 and not above retry_max_s",
                ));
            }
            if !(-720..=840).contains(&ble.device_zone_offset_min) {
                return Err(invalid(
                    "ble.device_zone_offset_min",
                    "must be a UTC offset in minutes (-720 to 840)",
                ));
            }
        }
        let password = match &raw.mqtt.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| invalid("mqtt.password_file", &e.to_string()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => None,
        };
        if raw.alerts.tick_s == 0 {
            return Err(invalid("alerts.tick_s", "must be at least 1"));
        }
        let alert_rules = if !raw.alerts.enabled {
            None
        } else if let Some(file) = &raw.alerts.rules_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| invalid("alerts.rules_file", &format!("{}: {e}", file.display())))?;
            Some(
                protocol::rules::RuleSet::from_toml(&text)
                    .map_err(|e| invalid("alerts.rules_file", &one_line(&e.to_string())))?,
            )
        } else {
            Some(
                protocol::rules::RuleSet::default_rules()
                    .map_err(|e| invalid("alerts", &format!("built-in rules: {e}")))?,
            )
        };
        let kiosk = match &raw.kiosk {
            Some(k) => Some(
                check_kiosk(k, alert_rules.is_some()).map_err(|(key, why)| invalid(&key, &why))?,
            ),
            None => None,
        };
        Ok(Config {
            mqtt_version,
            keep_alive: Duration::from_secs(raw.mqtt.keep_alive_s),
            raw,
            password,
            alert_rules,
            kiosk,
        })
    }
}

/// Checks `[kiosk]` and reads its secrets. Errors name the key, never the value (a token, a key).
fn check_kiosk(k: &KioskSection, alerts_on: bool) -> Result<KioskConfig, (String, String)> {
    let bad = |key: &str, why: &str| (key.to_owned(), why.to_owned());
    if !alerts_on {
        return Err(bad(
            "kiosk",
            "needs the edge alert engine ([alerts] enabled = true): the patient page's advice is its decision",
        ));
    }
    if k.devices.is_empty() {
        return Err(bad("kiosk.devices", "must name at least one device"));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, d) in k.devices.iter().enumerate() {
        if d.is_empty() || !seen.insert(d) {
            return Err(bad(
                &format!("kiosk.devices[{i}]"),
                "must be non-empty and unique",
            ));
        }
    }
    if k.idle_timeout_s < 2 {
        return Err(bad("kiosk.idle_timeout_s", "must be at least 2 seconds"));
    }
    if k.max_held == 0 || k.max_held > MAX_HELD_LIMIT {
        return Err(bad(
            "kiosk.max_held",
            &format!("must be 1..={MAX_HELD_LIMIT}"),
        ));
    }
    let first_line = |key: &str, file: &Path| -> Result<String, (String, String)> {
        std::fs::read_to_string(file)
            .map(|t| t.lines().next().unwrap_or_default().trim().to_owned())
            .map_err(|e| bad(key, &format!("{}: {}", file.display(), e.kind())))
    };
    let card_key = match (&k.card_key, &k.card_key_file) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "kiosk.card_key",
                "give card_key or card_key_file, not both",
            ));
        }
        (Some(hex), None) => Some(
            crate::kiosk::card::CardKey::from_hex(hex)
                .map_err(|e| bad("kiosk.card_key", &e.to_string()))?,
        ),
        (None, Some(file)) => Some(
            crate::kiosk::card::CardKey::from_hex(&first_line("kiosk.card_key_file", file)?)
                .map_err(|e| bad("kiosk.card_key_file", &e.to_string()))?,
        ),
        (None, None) => None,
    };
    if k.reader.is_some() && card_key.is_none() {
        return Err(bad(
            "kiosk.reader",
            "a card reader needs the card key (card_key or card_key_file) to recognise cards",
        ));
    }
    if k.baud == 0 {
        return Err(bad("kiosk.baud", "must be at least 1"));
    }
    if k.staff.is_empty() {
        return Err(bad(
            "kiosk.staff",
            "at least one staff token is needed for the staff page",
        ));
    }
    let mut staff = Vec::new();
    for (i, s) in k.staff.iter().enumerate() {
        let key = format!("kiosk.staff[{i}]");
        let id_ok = !s.id.is_empty()
            && s.id.len() <= 64
            && s.id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return Err(bad(
                &format!("{key}.id"),
                "must be 1-64 letters, digits or '._-'",
            ));
        }
        let token = match (&s.token, &s.token_file) {
            (Some(t), None) => t.clone(),
            (None, Some(file)) => first_line(&format!("{key}.token_file"), file)?,
            _ => return Err(bad(&key, "give token or token_file (one of them)")),
        };
        if token.chars().count() < MIN_STAFF_TOKEN {
            return Err(bad(
                &format!("{key}.token"),
                &format!("must be at least {MIN_STAFF_TOKEN} characters"),
            ));
        }
        if staff
            .iter()
            .any(|t: &crate::kiosk::StaffToken| t.id.0 == s.id || t.token == token)
        {
            return Err(bad(&key, "each staff id and token must be unique"));
        }
        staff.push(crate::kiosk::StaffToken {
            id: crate::kiosk::StaffId(s.id.clone()),
            token,
        });
    }
    Ok(KioskConfig { card_key, staff })
}

/// What [`check_bindings`] says is wrong: the key (`bindings[i].patient`) and why. Never the value: a
/// patient id that is refused may be a name.
pub type BindingProblem = (String, String);

/// Checks device bindings — the configuration file's and the CRM's alike: every patient is a
/// pseudonymous id ([`protocol::wire::is_valid_pseudonym`]), no device is empty, and no device (or cuff
/// user) is bound twice — two entries for one device would leave the patient to whichever comes last.
///
/// # Errors
/// The first problem, as key and reason.
pub fn check_bindings<'a>(
    bindings: impl IntoIterator<Item = (&'a str, Option<u8>, &'a str)>,
) -> Result<(), BindingProblem> {
    let mut seen: std::collections::HashMap<(&str, Option<u8>), usize> =
        std::collections::HashMap::new();
    for (i, (device, user_id, patient)) in bindings.into_iter().enumerate() {
        if device.is_empty() {
            return Err((format!("bindings[{i}].device"), "is empty".into()));
        }
        if !protocol::wire::is_valid_pseudonym(patient) {
            return Err((
                format!("bindings[{i}].patient"),
                "is not a pseudonymous id (letters, digits and '._:-', with at least one letter and \
                 one digit; no names or national id numbers)"
                    .into(),
            ));
        }
        if let Some(first) = seen.insert((device, user_id), i) {
            let whom = if user_id.is_some() {
                "device and user_id"
            } else {
                "device (for every user)"
            };
            return Err((
                format!("bindings[{i}]"),
                format!("binds the same {whom} as bindings[{first}]; keep one of the two"),
            ));
        }
    }
    Ok(())
}

/// `text` on one line (service logs take one entry per line).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The parser's message on one line, prefixed with where: `line L, column C: …`. toml's own rendering
/// quotes the offending line over several lines, which a service's log (journald: one entry per line)
/// tears apart; `gateway run` must fail with one `error:` line.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(e.message());
    match e.span().and_then(|s| text.get(..s.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
gateway_id = "gw-1"
[mqtt]
broker = "mqtt://127.0.0.1:1883"
[journal]
dir = "/tmp/j"
[[bindings]]
device = "meter-1"
patient = "p-001"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    /// The documented example is a valid configuration (so the documentation cannot drift from the code).
    #[test]
    fn example_config_parses() {
        let text = include_str!("../config.example.toml");
        // TLS files are read when connecting, not when parsing, so the example's paths need not exist.
        let c = parse(text).unwrap();
        assert_eq!(c.raw.simulated.len(), 2);
        assert_eq!(c.raw.bindings[1].user_id, Some(1));
        let ble = c
            .raw
            .ble
            .expect("the example documents [ble]")
            .to_ble_config();
        assert_eq!(ble.adapter.as_deref(), Some("hci0"));
        assert_eq!(ble.session_deadline, Duration::from_secs(180));
    }

    #[test]
    fn alert_rules_are_loaded_and_checked_before_anything_starts() {
        // Default: on, with the built-in CLINICAL.md rules.
        let c = parse(GOOD).unwrap();
        assert!(c.alert_rules.is_some());
        let off = parse(&format!("{GOOD}[alerts]\nenabled = false\n")).unwrap();
        assert!(off.alert_rules.is_none());
        let dir = tempfile::tempdir().unwrap();
        let bad_rules = dir.path().join("rules.toml");
        std::fs::write(&bad_rules, "version = 1\n[[rule]]\nid = \"X\"\n").unwrap();
        for (section, key) in [
            (
                format!("[alerts]\nrules_file = {bad_rules:?}\n"),
                "alerts.rules_file",
            ),
            (
                "[alerts]\nrules_file = \"/nonexistent/rules.toml\"\n".to_owned(),
                "alerts.rules_file",
            ),
            ("[alerts]\ntick_s = 0\n".to_owned(), "alerts.tick_s"),
        ] {
            let err = parse(&format!("{GOOD}{section}")).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn good_config_has_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.raw.mqtt.inflight, 100);
        assert_eq!(c.mqtt_version, MqttVersion::V5);
        assert_eq!(c.raw.journal.max_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("[journal]\n", "[journal]\nmax_bites = 5\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("max_bites"), "{e}");
        assert!(e.contains("line 6"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn a_name_as_patient_id_is_refused() {
        let e = parse(&GOOD.replace("p-001", "Jane Doe"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bindings[0].patient"), "{e}");
    }

    /// Issue 11 defect 10: two bindings for one device are refused naming both entries; the other
    /// checks name their key and bound.
    #[test]
    fn duplicate_bindings_and_oversized_stores_are_refused_by_key() {
        let twice = format!("{GOOD}[[bindings]]\ndevice = \"meter-1\"\npatient = \"p-002\"\n");
        let e = parse(&twice).unwrap_err().to_string();
        assert!(
            e.contains("bindings[1]") && e.contains("bindings[0]"),
            "{e}"
        );
        assert!(!e.contains("p-002"), "the value is not quoted: {e}");
        // One device for every user and the same device for user 1: two different bindings.
        let per_user =
            format!("{GOOD}[[bindings]]\ndevice = \"meter-1\"\nuser_id = 1\npatient = \"p-002\"\n");
        parse(&per_user).unwrap();
        let huge =
            format!("{GOOD}[[simulated]]\nkind = \"glucometer\"\nid = \"m\"\nstored = 100000000\n");
        let e = parse(&huge).unwrap_err().to_string();
        assert!(
            e.contains("simulated[0].stored") && e.contains("65535"),
            "{e}"
        );
        let e = parse(&GOOD.replace("p-001", "JohnSmith"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bindings[0].patient") && !e.contains("JohnSmith"),
            "{e}"
        );
        let e = parse(&GOOD.replace("[journal]\n", "max_config_bytes = 1048576\n[journal]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.max_packet_bytes"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (from, to, key) in [
            ("mqtt://127.0.0.1:1883", "http://x", "mqtt.broker"),
            ("gw-1", "gw/1", "gateway_id"),
            (
                "[journal]\n",
                "[journal]\nmax_bytes = 10\n",
                "journal.max_bytes",
            ),
        ] {
            let e = parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
