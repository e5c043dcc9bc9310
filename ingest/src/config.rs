//! `ingest run --config FILE`: the TOML configuration.
//!
//! Every table is optional; an empty file runs with the defaults (SQLite in `./ingest-data`, a broker on
//! `mqtt://127.0.0.1:1883`, the default rules, no webhook, no API). Unknown keys are
//! errors (`deny_unknown_fields`), and every error is one line naming the key:
//!
//! ```toml
//! instance = "ingest-a"                  # unique per instance (outbox leases, MQTT client id); default
//!                                        # ingest-{hostname}-{8 hex of the database's location}: stable
//!                                        # across restarts, so the broker's queued session is found again
//! data_dir = "/var/lib/phg-ingest"       # the SQLite file lives here unless [database] url is set
//!
//! [mqtt]
//! broker = "mqtt://127.0.0.1:1883"
//! group = "phg-ingest"                   # the shared-subscription group: instances share the stream;
//!                                        # "" = plain subscriptions, for one instance on a broker that does
//!                                        # not keep shared subscriptions over its restart (Mosquitto 2.0)
//! topic_root = "phg/v1"                  # subscribes $share/{group}/{topic_root}/+/readings (events, symptoms)
//! alerts_topic = "phg/ingest/alerts"     # where alert notices are published (QoS 1)
//! keep_alive_s = 30
//! max_batch = 256                        # messages stored per transaction, at most
//! max_message_size = 262144              # bytes; a larger message is recorded in bad_messages (no
//!                                        # content) and acknowledged; set the broker's limit to match
//!                                        # (Mosquitto: message_size_limit 262144)
//!
//! [database]
//! url = "postgres://ingest@db.internal/phg"   # or "sqlite:///path/file.sqlite"
//! ca_file = "/etc/phg/db-ca.pem"         # PostgreSQL over TLS (required for a server on another host,
//!                                        # unless allow_plaintext = true)
//!
//! [rules]
//! file = "/etc/phg/rules.toml"           # default: protocol's default rules (CLINICAL.md)
//! window_interval_s = 3600               # how often window rules run (7-day BP average, adherence);
//!                                        # confirmation timeouts and escalation fire at their deadlines
//! notify_from = "ADVISORY"               # alert changes pushed one by one from this severity up; those
//!                                        # below are stored and sent in a per-patient digest
//! digest_interval_s = 604800             # the digest period (weekly; 0: no digest)
//!
//! [webhook]
//! url = "https://crm.example/phg/alerts"   # http:// only to loopback, unless allow_plaintext = true
//! secret = "…"                           # HMAC-SHA256 key; or secret_file = "/etc/phg/webhook.key"
//! timeout_s = 10
//! initial_backoff_ms = 500
//! max_backoff_s = 300
//!
//! [outbox]
//! lease_s = 30                           # a claimed notice is re-claimable after this
//! poll_ms = 200
//!
//! [api]
//! listen = "127.0.0.1:8480"              # default "": no API; plain HTTP, so a non-loopback address
//!                                        # needs allow_plaintext = true (e.g. behind a TLS proxy)
//! token_file = "/etc/phg/api.token"      # or token = "…": the bearer token (≥ 16 bytes), required
//!
//! [[patients]]                           # protocol::rules::PatientSettings, guard-rails applied
//! patient = "p-0001"
//! profile = "CN"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::rules::{PatientSettings, RuleSet, Severity};
use serde::Deserialize;
use sha2::Digest;

/// A configuration error: one line, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or an unknown / mistyped key (the message names it and its line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message on one line.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    instance: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    rules: RawRules,
    webhook: Option<RawWebhook>,
    #[serde(default)]
    outbox: RawOutbox,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    patients: Vec<PatientSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMqtt {
    broker: String,
    client_id: Option<String>,
    group: String,
    topic_root: String,
    alerts_topic: String,
    keep_alive_s: u64,
    max_batch: usize,
    inflight: u16,
    max_message_size: usize,
    /// `mqtt://` to a host other than loopback, knowingly.
    allow_plaintext: bool,
    tls: Option<RawMqttTls>,
}

/// `[mqtt.tls]`: PEM files, read when the configuration is loaded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqttTls {
    ca: PathBuf,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            broker: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            group: "phg-ingest".into(),
            topic_root: protocol::wire::DEFAULT_TOPIC_PREFIX.into(),
            alerts_topic: "phg/ingest/alerts".into(),
            keep_alive_s: 30,
            max_batch: 256,
            inflight: 256,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            allow_plaintext: false,
            tls: None,
        }
    }
}

/// The default `[mqtt] max_message_size`: 256 KiB. The largest legitimate message is a reading or an
/// event of a few KiB (an unattributed-reading event carries a whole reading); 256 KiB leaves two orders
/// of magnitude of margin and still bounds what one publisher can make ingest hold.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 256 * 1024;

/// MQTT's own ceiling: the largest Remaining Length a fixed header can encode (MQTT 3.1.1 §2.2.3).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    /// PEM CA certificate(s) the PostgreSQL server's certificate must verify against: TLS, required.
    ca_file: Option<PathBuf>,
    /// Plaintext to a PostgreSQL server on another host, knowingly.
    #[serde(default)]
    allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRules {
    file: Option<PathBuf>,
    window_interval_s: u64,
    notify_from: Severity,
    digest_interval_s: u64,
}

impl Default for RawRules {
    fn default() -> Self {
        RawRules {
            file: None,
            window_interval_s: 3600,
            notify_from: crate::evaluate::DEFAULT_NOTIFY_FROM,
            digest_interval_s: 7 * 86_400,
        }
    }
}

const fn default_timeout_s() -> u64 {
    10
}
const fn default_initial_backoff_ms() -> u64 {
    500
}
const fn default_max_backoff_s() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default = "default_timeout_s")]
    timeout_s: u64,
    #[serde(default = "default_initial_backoff_ms")]
    initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_s")]
    max_backoff_s: u64,
    /// `http://` to a host other than loopback, knowingly.
    #[serde(default)]
    allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOutbox {
    lease_s: u64,
    poll_ms: u64,
}

impl Default for RawOutbox {
    fn default() -> Self {
        RawOutbox {
            lease_s: 30,
            poll_ms: 200,
        }
    }
}

/// `[api]`. Off unless configured (`listen` empty): it serves patient data, so it comes on only with an
/// address and a token.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    listen: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    /// Plain HTTP on an address other than loopback, knowingly (e.g. a TLS proxy in front).
    allow_plaintext: bool,
}

/// A secret given inline (`{section}.{name}`) or in a file (`{section}.{name}_file`, first line): exactly
/// one of the two, at least 16 bytes. The error is (key, reason).
fn secret_value(
    section: &str,
    name: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Secret, (String, String)> {
    let bytes = match (inline, file) {
        (Some(s), None) => s.into_bytes(),
        (None, Some(f)) => {
            let s = std::fs::read_to_string(&f).map_err(|e| {
                (
                    format!("{section}.{name}_file"),
                    format!("{}: {e}", f.display()),
                )
            })?;
            s.lines().next().unwrap_or_default().as_bytes().to_vec()
        }
        _ => {
            return Err((
                format!("{section}.{name}"),
                format!("set exactly one of {name} or {name}_file"),
            ));
        }
    };
    if bytes.len() < 16 {
        return Err((
            format!("{section}.{name}"),
            "must be at least 16 bytes".into(),
        ));
    }
    Ok(Secret::new(bytes))
}

/// A secret that never shows in `Debug` or logs.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// MQTT settings.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id of this instance (a persistent session: unacknowledged messages survive a reconnect).
    pub client_id: String,
    /// Shared-subscription group.
    pub group: String,
    /// Topic root (`phg/v1`).
    pub topic_root: String,
    /// Where alert notices go.
    pub alerts_topic: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Messages per storing transaction, at most.
    pub max_batch: usize,
    /// Messages the broker may have in flight to us (and requests queued to the client).
    pub inflight: u16,
    /// The largest message stored as a reading or event (bytes); also the client's incoming packet limit.
    pub max_message_size: usize,
    /// TLS to the broker (`mqtts://`).
    pub tls: Option<MqttTls>,
}

/// TLS material for the broker connection (DESIGN.md promise 8: TLS with client certificates).
#[derive(Clone)]
pub struct MqttTls {
    /// The CA certificate(s) that sign the broker's certificate (PEM).
    pub ca: Vec<u8>,
    /// This instance's client certificate chain and its private key (PEM), if the broker asks for one.
    pub client_auth: Option<(Vec<u8>, Secret)>,
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTls")
            .field("ca_bytes", &self.ca.len())
            .field("client_certificate", &self.client_auth.is_some())
            .finish()
    }
}

impl MqttConfig {
    /// rumqttc options for a client `client_id` of this broker: address, keep-alive and, for `mqtts://`,
    /// TLS with this configuration's CA and client certificate.
    pub fn options(&self, client_id: String) -> rumqttc::MqttOptions {
        let mut opts = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        opts.set_keep_alive(self.keep_alive);
        // rumqttc's default incoming limit is 10 KiB, and a larger packet drops the connection before the
        // message can be acknowledged (issue 11 defect 1). The fixed header counts too: a few bytes over.
        let packet = self
            .max_message_size
            .saturating_add(MQTT_OVERHEAD)
            .min(MQTT_MAX_PACKET);
        opts.set_max_packet_size(packet, packet);
        if let Some(tls) = &self.tls {
            // rumqttc builds its rustls configuration from the process's default crypto provider; with
            // both of rustls' providers in the build (reqwest brings ring) there is none until one is
            // installed. `Err` means one is installed already.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            opts.set_transport(rumqttc::Transport::tls(
                tls.ca.clone(),
                tls.client_auth
                    .as_ref()
                    .map(|(cert, key)| (cert.clone(), key.expose().to_vec())),
                None,
            ));
        }
        opts
    }
}

impl MqttConfig {
    /// The subscriptions: `$share/{group}/{root}/+/readings`, `…/events` and `…/symptoms`; with an empty
    /// group, the same without `$share/{group}/`. Mosquitto 2.0 keeps a persistent session's plain
    /// subscriptions over its own restart but not its shared ones: what gateways publish between the
    /// broker's restart and ingest's next connection is PUBACKed to them and dropped (tried from outside,
    /// docs/ingest.md). One instance loses nothing that way with plain subscriptions.
    pub fn filters(&self) -> [String; 3] {
        let prefix = if self.group.is_empty() {
            String::new()
        } else {
            format!("$share/{}/", self.group)
        };
        ["readings", "events", "symptoms"].map(|t| format!("{prefix}{}/+/{t}", self.topic_root))
    }
}

/// Webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where alert notices are POSTed.
    pub url: String,
    /// The HMAC-SHA256 key.
    pub secret: Secret,
    /// Per request.
    pub timeout: Duration,
    /// First retry delay (doubled per failure, with jitter).
    pub initial_backoff: Duration,
    /// Retry delay cap.
    pub max_backoff: Duration,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This instance's id.
    pub instance: String,
    /// Database URL (`sqlite://…` or `postgres://…`).
    pub database_url: String,
    /// For PostgreSQL: the CA certificate(s) (PEM) its server certificate must verify against; TLS when
    /// present.
    pub database_ca_pem: Option<Vec<u8>>,
    /// MQTT.
    pub mqtt: MqttConfig,
    /// The rules.
    pub rules: RuleSet,
    /// Window-rule interval.
    pub window_interval: Duration,
    /// Alert changes are pushed one by one from this severity up (CLINICAL.md §4.1: INFO is "none or
    /// weekly summary").
    pub notify_from: Severity,
    /// The digest period of the alerts below `notify_from`; `None`: no digest.
    pub digest_interval: Option<Duration>,
    /// Webhook, if any.
    pub webhook: Option<WebhookConfig>,
    /// Outbox lease.
    pub lease: Duration,
    /// Outbox poll interval.
    pub poll: Duration,
    /// API address, if enabled.
    pub api_listen: Option<SocketAddr>,
    /// The bearer token every API request but `/health` must carry (present whenever the API is on).
    pub api_token: Option<Secret>,
    /// Patients' settings from the file (validated against the rules).
    pub patients: Vec<PatientSettings>,
}

/// Room for a PUBLISH's topic and packet id beside its payload (a topic is at most 65535 bytes).
pub const MQTT_OVERHEAD: usize = 2 + 65_535 + 2;

/// The default instance id: `ingest-{hostname}-{8 hex}`, the hex from where the database is (the SQLite
/// file's absolute path; a PostgreSQL server's hosts, ports, database and user — not its password). The
/// same on every start, so the MQTT client id and with it the broker's persistent session survive a
/// restart (issue 11 defect 2: a per-process id left the queued messages in an orphaned session).
/// Two instances on one host sharing one database must set `instance` apart.
fn default_instance(database_url: &str) -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|f| std::fs::read_to_string(f).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let host = if host.is_empty() { "host".into() } else { host };
    let location = match database_url.strip_prefix("sqlite://") {
        Some(path) => {
            std::path::absolute(path).map_or_else(|_| path.to_owned(), |p| p.display().to_string())
        }
        None => match database_url.parse::<tokio_postgres::Config>() {
            Ok(c) => format!(
                "{:?} {:?} {:?} {:?}",
                c.get_hosts(),
                c.get_ports(),
                c.get_dbname(),
                c.get_user()
            ),
            Err(_) => database_url.to_owned(),
        },
    };
    let digest = sha2::Sha256::digest(location.as_bytes());
    format!(
        "ingest-{host}-{}",
        protocol::wire::to_hex(digest.get(..4).unwrap_or_default())
    )
}

/// `message` on one line with its line and column (toml's own rendering spans several lines).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span().and_then(|s| text.get(..s.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883) → (host, port, TLS).
fn broker_addr(url: &str) -> Option<(String, u16, bool)> {
    let (rest, tls, default_port) = match url.strip_prefix("mqtts://") {
        Some(rest) => (rest, true, 8883),
        None => (url.strip_prefix("mqtt://")?, false, 1883),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (h, p.parse().ok()?),
        _ => (rest, default_port),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.trim_matches(['[', ']']).to_owned(), port, tls))
}

/// The host of `rest`, an http(s) URL after its scheme (`user@host:port/path` → `host`).
fn url_host(rest: &str) -> &str {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    }
}

/// Whether `host` is this machine (plaintext MQTT to it never crosses a network).
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// [`ConfigError`], one line naming the file and the key.
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
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let data_dir = raw.data_dir.unwrap_or_else(|| PathBuf::from("ingest-data"));
        let database_url = match raw.database.url {
            Some(u) if u.trim().is_empty() => {
                return Err(invalid("database.url", "is empty".into()));
            }
            Some(u) => {
                if !(u.starts_with("sqlite://")
                    || u.starts_with("postgres://")
                    || u.starts_with("postgresql://")
                    || u.starts_with("host="))
                {
                    return Err(invalid(
                        "database.url",
                        "must start with sqlite://, postgres:// or postgresql://".into(),
                    ));
                }
                u
            }
            None => format!("sqlite://{}", data_dir.join("ingest.sqlite").display()),
        };
        let instance = match raw.instance {
            Some(i) => i,
            None => default_instance(&database_url),
        };
        if !protocol::wire::is_valid_topic_level(&instance) {
            return Err(invalid(
                "instance",
                "must be letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let postgres = !database_url.starts_with("sqlite://");
        let database_ca_pem = match (&raw.database.ca_file, postgres) {
            (Some(_), false) => {
                return Err(invalid(
                    "database.ca_file",
                    "applies to PostgreSQL only (SQLite is a local file)".into(),
                ));
            }
            (Some(f), true) => Some(
                std::fs::read(f)
                    .map_err(|e| invalid("database.ca_file", format!("{}: {e}", f.display())))?,
            ),
            (None, _) => None,
        };
        if postgres && database_ca_pem.is_none() && !raw.database.allow_plaintext {
            let remote = database_url
                .parse::<tokio_postgres::Config>()
                .map_err(|e| invalid("database.url", e.to_string()))?
                .get_hosts()
                .iter()
                .any(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => !is_loopback(name),
                    tokio_postgres::config::Host::Unix(_) => false,
                });
            if remote {
                return Err(invalid(
                    "database.url",
                    "plaintext PostgreSQL to another host would carry patient data in the clear; set \
                     database.ca_file (TLS), or database.allow_plaintext = true to accept the risk"
                        .into(),
                ));
            }
        }
        let (host, port, tls) = broker_addr(&raw.mqtt.broker).ok_or_else(|| {
            invalid(
                "mqtt.broker",
                format!(
                    "{:?} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
                    raw.mqtt.broker
                ),
            )
        })?;
        let read = |key: &str, path: &Path| {
            std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
        };
        let tls = match (tls, raw.mqtt.tls) {
            (false, Some(_)) => {
                return Err(invalid(
                    "mqtt.tls",
                    "is set but mqtt.broker is mqtt:// (plaintext); use mqtts://".into(),
                ));
            }
            (false, None) if !is_loopback(&host) && !raw.mqtt.allow_plaintext => {
                return Err(invalid(
                    "mqtt.broker",
                    "plaintext MQTT to another host would carry patient data in the clear; use \
                     mqtts:// with [mqtt.tls], or set mqtt.allow_plaintext = true to accept the risk"
                        .into(),
                ));
            }
            (false, None) => None,
            (true, None) => {
                return Err(invalid(
                    "mqtt.tls",
                    "mqtts:// needs [mqtt.tls] ca, the CA certificate that signs the broker's"
                        .into(),
                ));
            }
            (true, Some(t)) => Some(MqttTls {
                ca: read("mqtt.tls.ca", &t.ca)?,
                client_auth: match (t.client_cert, t.client_key) {
                    (Some(c), Some(k)) => Some((
                        read("mqtt.tls.client_cert", &c)?,
                        Secret::new(read("mqtt.tls.client_key", &k)?),
                    )),
                    (None, None) => None,
                    _ => {
                        return Err(invalid(
                            "mqtt.tls",
                            "client_cert and client_key go together; one of them is missing".into(),
                        ));
                    }
                },
            }),
        };
        for (key, v) in [
            ("mqtt.group", &raw.mqtt.group),
            ("mqtt.topic_root", &raw.mqtt.topic_root),
            ("mqtt.alerts_topic", &raw.mqtt.alerts_topic),
        ] {
            // An empty group is allowed: plain subscriptions (`MqttConfig::filters`).
            if key == "mqtt.group" && v.is_empty() {
                continue;
            }
            if v.is_empty() || v.contains(['+', '#']) || v.starts_with('/') || v.ends_with('/') {
                return Err(invalid(
                    key,
                    "must be a non-empty topic without wildcards or leading/trailing '/'".into(),
                ));
            }
        }
        if raw.mqtt.group.contains('/') {
            return Err(invalid("mqtt.group", "must not contain '/'".into()));
        }
        if raw.mqtt.max_batch == 0 || raw.mqtt.max_batch > 10_000 {
            return Err(invalid("mqtt.max_batch", "must be 1..=10000".into()));
        }
        if !(4096..=MQTT_MAX_PACKET - MQTT_OVERHEAD).contains(&raw.mqtt.max_message_size) {
            return Err(invalid(
                "mqtt.max_message_size",
                format!("must be 4096..={} bytes", MQTT_MAX_PACKET - MQTT_OVERHEAD),
            ));
        }
        if raw.mqtt.inflight == 0 {
            return Err(invalid("mqtt.inflight", "must be at least 1".into()));
        }
        if raw.mqtt.keep_alive_s < 5 {
            return Err(invalid("mqtt.keep_alive_s", "must be at least 5".into()));
        }
        let rules = match &raw.rules.file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| invalid("rules.file", format!("{}: {e}", f.display())))?;
                RuleSet::from_toml(&text)
                    .map_err(|e| invalid("rules.file", format!("{}: {e}", f.display())))?
            }
            None => RuleSet::default_rules()
                .map_err(|e| invalid("rules", format!("default rules: {e}")))?,
        };
        if raw.rules.window_interval_s == 0 {
            return Err(invalid(
                "rules.window_interval_s",
                "must be at least 1".into(),
            ));
        }
        let webhook = match raw.webhook {
            None => None,
            Some(w) => {
                let host = match (
                    w.url.strip_prefix("http://"),
                    w.url.strip_prefix("https://"),
                ) {
                    (Some(rest), _) => Some(url_host(rest)),
                    (None, Some(_)) => None,
                    (None, None) => {
                        return Err(invalid(
                            "webhook.url",
                            "must be an http:// or https:// URL".into(),
                        ));
                    }
                };
                // Alert notices name patients and their readings: plain HTTP only where it never
                // crosses a network, as for MQTT and PostgreSQL above.
                if host.is_some_and(|h| !is_loopback(h)) && !w.allow_plaintext {
                    return Err(invalid(
                        "webhook.url",
                        "plain http:// to another host would carry patient data in the clear; use \
                         https://, or set webhook.allow_plaintext = true to accept the risk"
                            .into(),
                    ));
                }
                let secret = secret_value("webhook", "secret", w.secret, w.secret_file)
                    .map_err(|(key, reason)| invalid(&key, reason))?;
                if w.timeout_s == 0 || w.initial_backoff_ms == 0 || w.max_backoff_s == 0 {
                    return Err(invalid(
                        "webhook",
                        "timeout_s, initial_backoff_ms and max_backoff_s must be positive".into(),
                    ));
                }
                Some(WebhookConfig {
                    url: w.url,
                    secret,
                    timeout: Duration::from_secs(w.timeout_s),
                    initial_backoff: Duration::from_millis(w.initial_backoff_ms),
                    max_backoff: Duration::from_secs(w.max_backoff_s),
                })
            }
        };
        if raw.outbox.lease_s == 0 || raw.outbox.poll_ms == 0 {
            return Err(invalid(
                "outbox",
                "lease_s and poll_ms must be positive".into(),
            ));
        }
        if let Some(w) = &webhook
            && Duration::from_secs(raw.outbox.lease_s) <= w.timeout
        {
            return Err(invalid(
                "outbox.lease_s",
                "must be longer than webhook.timeout_s (a lease must outlive a delivery)".into(),
            ));
        }
        let api_listen = if raw.api.listen.is_empty() {
            None
        } else {
            Some(raw.api.listen.parse().map_err(|_| {
                invalid(
                    "api.listen",
                    format!("{:?} is not an address like 127.0.0.1:8480", raw.api.listen),
                )
            })?)
        };
        // The API speaks plain HTTP: on an address other than loopback only knowingly (a TLS proxy in
        // front), as for MQTT, PostgreSQL and the webhook.
        if api_listen.is_some_and(|a: SocketAddr| !a.ip().is_loopback()) && !raw.api.allow_plaintext
        {
            return Err(invalid(
                "api.listen",
                "the API is plain HTTP and would serve patient data in the clear on this address; \
                 listen on loopback behind a TLS proxy, or set api.allow_plaintext = true to accept \
                 the risk"
                    .into(),
            ));
        }
        // The API serves patient readings and takes acknowledgements and settings: never without a
        // token, on any address (another account on the same host is not the CRM either).
        let api_token = match (api_listen, raw.api.token, raw.api.token_file) {
            (None, _, _) => None,
            (Some(_), None, None) => {
                return Err(invalid(
                    "api.token",
                    "the API needs a bearer token: set token or token_file (at least 16 bytes), or \
                     listen = \"\" to turn the API off"
                        .into(),
                ));
            }
            (Some(_), token, file) => Some(
                secret_value("api", "token", token, file)
                    .map_err(|(key, reason)| invalid(&key, reason))?,
            ),
        };
        let mut patients = Vec::new();
        for (i, p) in raw.patients.into_iter().enumerate() {
            if !protocol::wire::is_valid_pseudonym(&p.patient) {
                return Err(invalid(
                    &format!("patients[{i}].patient"),
                    "must be a pseudonymous id".into(),
                ));
            }
            patients.push(
                p.validated(&rules)
                    .map_err(|e| invalid(&format!("patients[{i}]"), e.to_string()))?,
            );
        }
        let client_id = raw
            .mqtt
            .client_id
            .unwrap_or_else(|| format!("phg-ingest-{instance}"));
        Ok(Config {
            mqtt: MqttConfig {
                host,
                port,
                client_id,
                group: raw.mqtt.group,
                topic_root: raw.mqtt.topic_root,
                alerts_topic: raw.mqtt.alerts_topic,
                keep_alive: Duration::from_secs(raw.mqtt.keep_alive_s),
                max_batch: raw.mqtt.max_batch,
                inflight: raw.mqtt.inflight,
                max_message_size: raw.mqtt.max_message_size,
                tls,
            },
            instance,
            database_url,
            database_ca_pem,
            rules,
            window_interval: Duration::from_secs(raw.rules.window_interval_s),
            notify_from: raw.rules.notify_from,
            digest_interval: (raw.rules.digest_interval_s > 0)
                .then(|| Duration::from_secs(raw.rules.digest_interval_s)),
            webhook,
            lease: Duration::from_secs(raw.outbox.lease_s),
            poll: Duration::from_millis(raw.outbox.poll_ms),
            api_listen,
            api_token,
            patients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        Config::parse(s, Path::new("ingest.toml")).map_err(|e| e.to_string())
    }

    /// Issue 11 item 14: INFO is not pushed per change by default, and is digested weekly.
    #[test]
    fn alert_push_threshold_and_digest() {
        let c = parse("").expect("defaults");
        assert_eq!(c.notify_from, Severity::Advisory);
        assert_eq!(c.digest_interval, Some(Duration::from_secs(7 * 86_400)));
        let c = parse("[rules]\nnotify_from = \"INFO\"\ndigest_interval_s = 0\n").expect("valid");
        assert_eq!((c.notify_from, c.digest_interval), (Severity::Info, None));
        let e = parse("[rules]\nnotify_from = \"loud\"\n").expect_err("not a severity");
        assert!(e.contains("line 2"), "{e}");
    }

    /// `group = ""`: one instance subscribing without `$share/`, which Mosquitto 2.0 keeps over its own
    /// restart; a group with '/' or a wildcard is still refused.
    #[test]
    fn an_empty_group_subscribes_plainly() {
        let c = parse("[mqtt]\ngroup = \"\"\n").expect("an empty group is valid");
        assert_eq!(
            c.mqtt.filters(),
            [
                "phg/v1/+/readings".to_owned(),
                "phg/v1/+/events".to_owned(),
                "phg/v1/+/symptoms".to_owned()
            ]
        );
        for bad in ["a/b", "a+", "#"] {
            let e = parse(&format!("[mqtt]\ngroup = \"{bad}\"\n")).expect_err(bad);
            assert!(e.contains("mqtt.group"), "{e}");
        }
    }

    /// The packaged /etc/phg/ingest.toml: one instance beside a local Mosquitto, so plain subscriptions
    /// (a broker restart must not drop what gateways publish before ingest reconnects).
    #[test]
    fn the_packaged_configuration_subscribes_plainly() {
        let c = parse(include_str!("../../packaging/ingest/ingest.toml")).expect("packaged file");
        assert!(
            c.mqtt.filters().iter().all(|f| !f.starts_with("$share/")),
            "{:?}",
            c.mqtt.filters()
        );
    }

    #[test]
    fn empty_file_runs_on_defaults() {
        let c = parse("").expect("defaults");
        assert!(
            c.database_url.starts_with("sqlite://"),
            "{}",
            c.database_url
        );
        assert!(c.database_url.ends_with("ingest.sqlite"));
        assert_eq!((c.mqtt.host.as_str(), c.mqtt.port), ("127.0.0.1", 1883));
        assert_eq!(
            c.mqtt.filters(),
            [
                "$share/phg-ingest/phg/v1/+/readings".to_owned(),
                "$share/phg-ingest/phg/v1/+/events".to_owned(),
                "$share/phg-ingest/phg/v1/+/symptoms".to_owned()
            ]
        );
        assert!(c.webhook.is_none());
        assert_eq!(c.window_interval, Duration::from_secs(3600));
        assert!(c.api_listen.is_none(), "no API unless configured");
    }

    /// The API serves patient data: it needs a bearer token, given inline or in a file, never printed.
    #[test]
    fn the_api_needs_a_token() {
        let e = parse("[api]\nlisten = \"127.0.0.1:8480\"\n").expect_err("no token");
        assert!(e.contains("api.token") && e.contains("bearer token"), "{e}");
        let e =
            parse("[api]\nlisten = \"127.0.0.1:8480\"\ntoken = \"short\"\n").expect_err("short");
        assert!(e.contains("api.token") && e.contains("16 bytes"), "{e}");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("api.token");
        std::fs::write(&file, "from-a-file-0123456789\n").expect("write token");
        let c = parse(&format!(
            "[api]\nlisten = \"127.0.0.1:8480\"\ntoken_file = \"{}\"\n",
            file.display()
        ))
        .expect("valid");
        let token = c.api_token.expect("a token");
        assert_eq!(token.expose(), b"from-a-file-0123456789");
        let c = parse("[api]\nlisten = \"127.0.0.1:8480\"\ntoken = \"inline-token-0123456789\"\n")
            .expect("valid");
        assert!(!format!("{c:?}").contains("inline-token-0123456789"));
    }

    #[test]
    fn errors_are_one_line_and_name_the_key() {
        for (text, key) in [
            ("[mqtt]\nbrokr = \"mqtt://x\"\n", "brokr"),
            ("[mqtt]\nbroker = \"http://x\"\n", "mqtt.broker"),
            ("[mqtt]\nmax_batch = 0\n", "mqtt.max_batch"),
            ("[database]\nurl = \"mysql://x\"\n", "database.url"),
            (
                "[webhook]\nurl = \"http://127.0.0.1/x\"\nsecret = \"short\"\n",
                "webhook.secret",
            ),
            (
                "[webhook]\nurl = \"http://crm.example/x\"\nsecret = \"0123456789abcdef\"\n",
                "webhook.url: plain http://",
            ),
            (
                "[api]\nlisten = \"0.0.0.0:8480\"\ntoken = \"0123456789abcdef\"\n",
                "api.listen: the API is plain HTTP",
            ),
            ("[mqtt]\nmax_message_size = 10\n", "mqtt.max_message_size"),
            (
                "[webhook]\nurl = \"ftp://x\"\nsecret = \"0123456789abcdef\"\n",
                "webhook.url",
            ),
            ("[api]\nlisten = \"nowhere\"\n", "api.listen"),
            (
                "[database]\nurl = \"postgres://ingest@db.internal/phg\"\n",
                "database.url",
            ),
            (
                "[database]\nurl = \"sqlite:///tmp/x.sqlite\"\nca_file = \"/x\"\n",
                "database.ca_file",
            ),
            ("[mqtt]\nbroker = \"mqtts://broker.example\"\n", "mqtt.tls"),
            (
                "[mqtt]\nbroker = \"mqtt://127.0.0.1\"\n[mqtt.tls]\nca = \"/x\"\n",
                "mqtt.tls",
            ),
            ("[mqtt]\nbroker = \"mqtt://broker.example\"\n", "plaintext"),
            (
                "[mqtt]\nbroker = \"mqtts://b.example\"\n[mqtt.tls]\nca = \"/no/such/ca.pem\"\n",
                "mqtt.tls.ca",
            ),
            ("[rules]\nwindow_interval_s = \"x\"\n", "line 2"),
            (
                "[[patients]]\npatient = \"has space\"\n",
                "patients[0].patient",
            ),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(key), "{text:?} → {e}");
            assert!(!e.contains('\n'), "one line: {e}");
            assert!(e.starts_with("ingest.toml: "), "{e}");
        }
    }

    /// `mqtts://` reads the PEM files at load time; a client certificate needs its key; the key never
    /// shows in `Debug`.
    #[test]
    fn mqtt_tls_files_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p.display().to_string()
        };
        let (ca, cert, key) = (
            f("ca.pem", "CA PEM"),
            f("c.pem", "CERT PEM"),
            f("c.key", "SECRET KEY PEM"),
        );
        let c = parse(&format!(
            "[mqtt]\nbroker = \"mqtts://broker.example\"\n[mqtt.tls]\nca = \"{ca}\"\nclient_cert = \"{cert}\"\nclient_key = \"{key}\"\n"
        ))
        .expect("valid");
        assert_eq!(
            (c.mqtt.host.as_str(), c.mqtt.port),
            ("broker.example", 8883)
        );
        let tls = c.mqtt.tls.clone().expect("TLS");
        assert_eq!(tls.ca, b"CA PEM");
        assert!(!format!("{c:?}").contains("SECRET KEY"));
        let e = parse(&format!(
            "[mqtt]\nbroker = \"mqtts://b.example:8884\"\n[mqtt.tls]\nca = \"{ca}\"\nclient_cert = \"{cert}\"\n"
        ))
        .expect_err("cert without key");
        assert!(e.contains("client_key"), "{e}");
        let c = parse("[mqtt]\nbroker = \"mqtt://broker.example\"\nallow_plaintext = true\n")
            .expect("plaintext, knowingly");
        assert!(c.mqtt.tls.is_none());
    }

    /// The default instance (and so the MQTT client id of the persistent session) is the same on every
    /// start of the same installation, and differs between databases (issue 11 defect 2: it was
    /// `ingest-{pid}`, and a restart lost what the broker had queued).
    #[test]
    fn the_default_instance_is_stable_per_database() {
        let a = parse("data_dir = \"/var/lib/a\"\n").expect("valid");
        let again = parse("data_dir = \"/var/lib/a\"\n").expect("valid");
        let b = parse("data_dir = \"/var/lib/b\"\n").expect("valid");
        assert_eq!(a.instance, again.instance);
        assert_eq!(a.mqtt.client_id, again.mqtt.client_id);
        assert_ne!(a.instance, b.instance);
        assert!(!a.instance.contains(&std::process::id().to_string()));
        assert!(
            protocol::wire::is_valid_topic_level(&a.instance),
            "{}",
            a.instance
        );
        let set = parse("instance = \"ingest-a\"\n").expect("valid");
        assert_eq!(set.mqtt.client_id, "phg-ingest-ingest-a");
    }

    /// Plaintext is refused off loopback for the webhook and the API as for MQTT and PostgreSQL, and
    /// allowed knowingly.
    #[test]
    fn plaintext_off_loopback_only_knowingly() {
        parse("[webhook]\nurl = \"http://localhost:9/x\"\nsecret = \"0123456789abcdef\"\n")
            .expect("loopback");
        parse("[webhook]\nurl = \"https://crm.example/x\"\nsecret = \"0123456789abcdef\"\n")
            .expect("TLS");
        parse(
            "[webhook]\nurl = \"http://crm.example/x\"\nsecret = \"0123456789abcdef\"\nallow_plaintext = true\n",
        )
        .expect("knowingly");
        parse("[api]\nlisten = \"0.0.0.0:8480\"\ntoken = \"0123456789abcdef\"\nallow_plaintext = true\n")
            .expect("knowingly");
        parse("[api]\nlisten = \"[::1]:8480\"\ntoken = \"0123456789abcdef\"\n").expect("loopback");
    }

    #[test]
    fn webhook_secret_is_not_printed() {
        let c = parse(
            "[webhook]\nurl = \"http://127.0.0.1:9/x\"\nsecret = \"0123456789abcdef-secret\"\n",
        )
        .expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("0123456789abcdef-secret"), "{dbg}");
    }

    #[test]
    fn patient_settings_pass_the_guard_rails() {
        let c = parse("[[patients]]\npatient = \"p-0001\"\nprofile = \"CN\"\n").expect("valid");
        assert_eq!(c.patients.len(), 1);
        assert_eq!(c.patients[0].profile, Some(protocol::rules::Profile::CN));
    }
}
