//! The uplink's settings, and their validation into a [`CheckedUplinkConfig`] the event loop can trust.
//!
//! The split follows ripgrep's low/high arguments: [`UplinkConfig`] is what an operator (or the daemon's
//! config file) says, [`CheckedUplinkConfig`] is what was proven usable — a parsed broker address, TLS
//! material read from disk, bounds that cannot panic inside rumqttc (its `set_keep_alive` asserts).
//! Everything that can be wrong with the settings is found here, at start-up, with an error that names the
//! setting; nothing in the event loop fails for a reason the operator could have fixed in the file.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which MQTT protocol version the uplink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 5: publishes carry `content-type: application/json`, and a PUBACK can refuse a message with a
    /// reason code (the uplink then keeps the record and retries).
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers without MQTT 5.
    V311,
}

/// A secret (the broker password) that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the one place that must send it (the MQTT CONNECT packet).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// PEM files for TLS to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that sign the broker's certificate (PEM).
    pub ca: PathBuf,
    /// This gateway's client certificate chain (PEM), for brokers that authenticate gateways by
    /// certificate (DESIGN promise 8). Needs `client_key` too.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

/// The uplink's settings as given. Check them with [`UplinkConfig::validate`] (which
/// [`run`](super::run) does first).
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (default 8883).
    pub broker: String,
    /// The MQTT client id; also what the broker keys the last will on. Must not be empty.
    pub client_id: String,
    /// MQTT 5 (default) or 3.1.1.
    pub mqtt_version: MqttVersion,
    /// The most records handed to the broker and not yet PUBACKed (default 100).
    pub inflight: u16,
    /// MQTT keep-alive: how soon a silent broker connection is declared dead. At least 5 s (rumqttc's
    /// MQTT 5 client asserts that), at most 65 535 s.
    pub keep_alive: Duration,
    /// TLS material; required with `mqtts://`, refused with `mqtt://`.
    pub tls: Option<TlsFiles>,
    /// Allow unencrypted MQTT to a host that is not loopback. Off by default: readings are health data
    /// (DESIGN promise 8), so plaintext off the box must be an explicit decision.
    pub allow_plaintext: bool,
    /// Broker user name, if the broker wants one.
    pub username: Option<String>,
    /// Broker password (needs `username`).
    pub password: Option<Secret>,
    /// The retained status topic (`phg/v1/{gateway_id}/status`): "online" on every connect, "offline" as
    /// the last will and on a clean shutdown.
    pub status_topic: String,
    /// The retained payload published on `status_topic` after every CONNACK.
    pub online_payload: Vec<u8>,
    /// The retained payload the broker publishes on `status_topic` if the gateway vanishes (the last
    /// will), also published by the gateway itself before a clean disconnect.
    pub offline_payload: Vec<u8>,
    /// The first reconnect delay's upper bound (full jitter: each delay is uniform in `0..=bound`).
    pub backoff_min: Duration,
    /// The largest reconnect delay bound; the bound doubles per failed attempt up to this.
    pub backoff_max: Duration,
    /// How long a shutdown waits for outstanding PUBACKs before disconnecting anyway (what is not acked
    /// stays in the journal and goes out after the next start).
    pub shutdown_grace: Duration,
    /// TCP + TLS + CONNACK must complete within this (whole seconds, at least 1 s).
    pub connect_timeout: Duration,
    /// Subscribe (QoS 1) to this topic after every CONNACK and pass each message's payload to `inbound`
    /// — the CRM's retained configuration (`phg/v1/{gateway_id}/config`). `None`: no subscription.
    pub config_topic: Option<String>,
    /// Where the messages of `config_topic` go. A message that finds the channel full is dropped with a
    /// warning: the configuration is retained, so the next connection brings it again.
    pub inbound: Option<tokio::sync::mpsc::Sender<Inbound>>,
    /// The largest MQTT packet the gateway takes from the broker, bytes: announced as the MQTT 5 CONNECT
    /// property *Maximum Packet Size* (MQTT 5.0 §3.1.2.11.4: the broker must not send a larger packet,
    /// it drops it instead) and enforced on reading with either version. It must hold the largest
    /// legitimate message the gateway subscribes to — the CRM's configuration — with room for its topic
    /// and headers. At least [`MIN_MAX_PACKET_BYTES`].
    pub max_packet_bytes: u32,
    /// How long acks written without their own `fdatasync` may wait for one when no append brings it
    /// (default 25 s: why, at `uplink::ACK_SYNC_AFTER`).
    pub ack_sync_after: Duration,
    /// Renders the online status afresh (journal depth, devices, adapter) for every CONNACK and every
    /// `status_every`; `None`: `online_payload` as it is.
    pub status_source: Option<StatusSource>,
    /// How often the online status is published again while connected (retained; at least 1 s).
    pub status_every: Duration,
    /// The watchdog's handle: the uplink checks in from its loop (see [`crate::liveness`]).
    pub heartbeat: Option<crate::liveness::Heartbeat>,
    /// Where the uplink records connection changes and PUBACKs for `gateway status`.
    pub link_state: Option<crate::status::LinkState>,
}

/// The default of [`UplinkConfig::max_packet_bytes`]: 1 MiB, four times the default limit on a CRM
/// configuration (`[mqtt] max_config_bytes`, 256 KiB) — the configuration is the largest message the
/// gateway receives; everything else it receives is an ack.
pub const DEFAULT_MAX_PACKET_BYTES: u32 = 1024 * 1024;
/// The smallest [`UplinkConfig::max_packet_bytes`]: acks, and a small configuration.
pub const MIN_MAX_PACKET_BYTES: u32 = 16 * 1024;

/// What the uplink passes on from the configuration topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A message's payload.
    Message(Vec<u8>),
    /// A packet over [`UplinkConfig::max_packet_bytes`] came from the broker (MQTT 3.1.1 has no way to
    /// announce the limit). It was not read; the uplink reconnected without the configuration
    /// subscription, so the retained message cannot bring the connection down again, and subscribes
    /// again after a while (see the uplink's module doc).
    TooLarge {
        /// The packet's size as its header announced it.
        bytes: usize,
        /// The limit.
        max: u32,
    },
}

/// A function that renders the current online status payload (see [`UplinkConfig::status_source`]).
#[derive(Clone)]
pub struct StatusSource(pub std::sync::Arc<dyn Fn() -> Vec<u8> + Send + Sync>);

impl std::fmt::Debug for StatusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusSource(..)")
    }
}

impl UplinkConfig {
    /// The defaults for everything but the three settings that have none.
    pub fn new(
        broker: impl Into<String>,
        client_id: impl Into<String>,
        status_topic: impl Into<String>,
    ) -> Self {
        Self {
            broker: broker.into(),
            client_id: client_id.into(),
            mqtt_version: MqttVersion::V5,
            inflight: 100,
            keep_alive: Duration::from_secs(30),
            tls: None,
            allow_plaintext: false,
            username: None,
            password: None,
            status_topic: status_topic.into(),
            online_payload: br#"{"state":"online"}"#.to_vec(),
            offline_payload: br#"{"state":"offline"}"#.to_vec(),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            config_topic: None,
            inbound: None,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            ack_sync_after: super::ACK_SYNC_AFTER,
            status_source: None,
            status_every: Duration::from_secs(60),
            heartbeat: None,
            link_state: None,
        }
    }

    /// Checks every setting and reads the TLS files.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first setting that is wrong. Nothing is connected yet.
    pub fn validate(&self) -> Result<CheckedUplinkConfig, ConfigError> {
        let endpoint = parse_broker_url(&self.broker)?;

        if self.client_id.is_empty() {
            return Err(ConfigError::EmptyClientId);
        }
        if self.client_id.len() > usize::from(u16::MAX) {
            return Err(ConfigError::ClientIdTooLong);
        }
        if self.inflight == 0 {
            return Err(ConfigError::ZeroInflight);
        }
        // rumqttc's MQTT 5 options assert keep_alive >= 5 s; the wire field is u16 seconds.
        if self.keep_alive < Duration::from_secs(5)
            || self.keep_alive.as_secs() > u64::from(u16::MAX)
        {
            return Err(ConfigError::KeepAlive(self.keep_alive));
        }
        if self.connect_timeout < Duration::from_secs(1) {
            return Err(ConfigError::ConnectTimeout(self.connect_timeout));
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return Err(ConfigError::Backoff {
                min: self.backoff_min,
                max: self.backoff_max,
            });
        }
        if self.status_topic.is_empty() || !rumqttc::valid_topic(&self.status_topic) {
            return Err(ConfigError::StatusTopic(self.status_topic.clone()));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(ConfigError::PasswordWithoutUsername);
        }
        if let Some(t) = &self.config_topic
            && (t.is_empty() || !rumqttc::valid_topic(t))
        {
            return Err(ConfigError::ConfigTopic(t.clone()));
        }
        if self.max_packet_bytes < MIN_MAX_PACKET_BYTES {
            return Err(ConfigError::MaxPacketBytes(self.max_packet_bytes));
        }

        let tls = match (endpoint.tls, &self.tls) {
            (false, Some(_)) => return Err(ConfigError::TlsWithPlainUrl),
            (true, None) => return Err(ConfigError::MqttsWithoutCa),
            (true, Some(files)) => Some(read_tls(files)?),
            (false, None) => {
                if !self.allow_plaintext && !is_loopback(&endpoint.host) {
                    return Err(ConfigError::PlaintextRefused {
                        host: endpoint.host,
                    });
                }
                None
            }
        };

        Ok(CheckedUplinkConfig {
            host: endpoint.host,
            port: endpoint.port,
            tls,
            client_id: self.client_id.clone(),
            mqtt_version: self.mqtt_version,
            inflight: self.inflight,
            keep_alive: self.keep_alive,
            username: self.username.clone(),
            password: self.password.clone(),
            status_topic: self.status_topic.clone(),
            online_payload: self.online_payload.clone(),
            offline_payload: self.offline_payload.clone(),
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            shutdown_grace: self.shutdown_grace,
            connect_timeout_secs: self.connect_timeout.as_secs(),
            config_topic: self.config_topic.clone(),
            inbound: self.inbound.clone(),
            connected_flag: None,
            max_packet_bytes: self.max_packet_bytes,
            ack_sync_after: self.ack_sync_after,
            status_source: self.status_source.clone(),
            status_every: self.status_every.max(Duration::from_secs(1)),
            heartbeat: self.heartbeat.clone(),
            link_state: self.link_state.clone(),
        })
    }
}

/// Why an [`UplinkConfig`] was refused. Each variant names the setting to fix; nothing was connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `broker` is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("uplink.broker `{url}`: {why} (expected mqtt://host:port or mqtts://host:port)")]
    BrokerUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Plaintext MQTT to a host other than loopback, without `allow_plaintext`.
    #[error(
        "uplink.broker: refusing unencrypted MQTT to non-loopback host `{host}` — readings are health \
         data; use mqtts:// with uplink.tls, or set uplink.allow_plaintext = true to accept the risk"
    )]
    PlaintextRefused {
        /// The broker host.
        host: String,
    },
    /// `mqtts://` without `tls.ca`.
    #[error(
        "uplink.tls: mqtts:// needs uplink.tls.ca, the CA certificate that signs the broker's certificate"
    )]
    MqttsWithoutCa,
    /// TLS files with an `mqtt://` URL: the operator meant TLS but the URL says plaintext.
    #[error("uplink.tls is set but uplink.broker is mqtt:// (plaintext); use mqtts://")]
    TlsWithPlainUrl,
    /// Only one of `tls.client_cert` and `tls.client_key`.
    #[error("uplink.tls: client_cert and client_key go together; one of them is missing")]
    ClientCertWithoutKey,
    /// A TLS file could not be read.
    #[error("uplink.tls: cannot read {}: {source}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file has no PEM block of the expected kind.
    #[error("uplink.tls: {} holds no PEM {what}", path.display())]
    TlsPem {
        /// The file.
        path: PathBuf,
        /// What was looked for ("CERTIFICATE", "PRIVATE KEY").
        what: &'static str,
    },
    /// `client_id` is empty.
    #[error(
        "uplink.client_id must not be empty (the broker keys the last will and the session on it)"
    )]
    EmptyClientId,
    /// `client_id` does not fit an MQTT string.
    #[error("uplink.client_id is longer than 65535 bytes")]
    ClientIdTooLong,
    /// `inflight` is 0.
    #[error("uplink.inflight must be at least 1")]
    ZeroInflight,
    /// `keep_alive` outside 5 s ..= 65535 s.
    #[error("uplink.keep_alive {0:?} is outside 5 s ..= 65535 s")]
    KeepAlive(Duration),
    /// `connect_timeout` under a second.
    #[error("uplink.connect_timeout {0:?} is under 1 s")]
    ConnectTimeout(Duration),
    /// `backoff_min` is zero or above `backoff_max`.
    #[error("uplink.backoff_min {min:?} must be above zero and at most uplink.backoff_max {max:?}")]
    Backoff {
        /// `backoff_min`.
        min: Duration,
        /// `backoff_max`.
        max: Duration,
    },
    /// `max_packet_bytes` is below [`MIN_MAX_PACKET_BYTES`].
    #[error("uplink.max_packet_bytes {0} is below the minimum of {MIN_MAX_PACKET_BYTES}")]
    MaxPacketBytes(u32),
    /// `config_topic` is empty or has wildcards.
    #[error("uplink.config_topic `{0}` is not a valid topic name (empty, or has + or #)")]
    ConfigTopic(String),
    /// `status_topic` is empty or has wildcards.
    #[error("uplink.status_topic `{0}` is not a valid topic name (empty, or has + or #)")]
    StatusTopic(String),
    /// A password without a user name.
    #[error("uplink.password is set without uplink.username")]
    PasswordWithoutUsername,
}

/// TLS material read from disk at validation time, so a missing file stops start-up instead of failing
/// every reconnect.
#[derive(Clone)]
pub(crate) struct TlsMaterial {
    pub(crate) ca: Vec<u8>,
    pub(crate) client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: show only that it is there.
        f.debug_struct("TlsMaterial")
            .field("ca_bytes", &self.ca.len())
            .field("client_auth", &self.client_auth.is_some())
            .finish()
    }
}

/// A validated [`UplinkConfig`]: made only by [`UplinkConfig::validate`].
#[derive(Debug, Clone)]
pub struct CheckedUplinkConfig {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: Option<TlsMaterial>,
    pub(crate) client_id: String,
    pub(crate) mqtt_version: MqttVersion,
    pub(crate) inflight: u16,
    pub(crate) keep_alive: Duration,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) status_topic: String,
    pub(crate) online_payload: Vec<u8>,
    pub(crate) offline_payload: Vec<u8>,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) connect_timeout_secs: u64,
    pub(crate) config_topic: Option<String>,
    pub(crate) inbound: Option<tokio::sync::mpsc::Sender<Inbound>>,
    /// Kept `true` while connected (the kiosk's staff page shows it).
    pub(crate) connected_flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub(crate) max_packet_bytes: u32,
    pub(crate) ack_sync_after: Duration,
    pub(crate) status_source: Option<StatusSource>,
    pub(crate) status_every: Duration,
    pub(crate) heartbeat: Option<crate::liveness::Heartbeat>,
    pub(crate) link_state: Option<crate::status::LinkState>,
}

impl CheckedUplinkConfig {
    /// The broker host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The broker port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_broker_url(url: &str) -> Result<Endpoint, ConfigError> {
    let bad = |why| ConfigError::BrokerUrl {
        url: url.to_owned(),
        why,
    };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(bad("unknown scheme"));
    };
    // A trailing slash is harmless; a path, query or credentials in the URL are not supported (the
    // password has its own redacted setting).
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad("only host and port are allowed"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in IPv6 host"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            ),
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = match port {
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("port is not 1..=65535")),
            Ok(p) => p,
        },
    };
    Ok(Endpoint {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// Loopback means the bytes never leave the box: `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn read_tls(files: &TlsFiles) -> Result<TlsMaterial, ConfigError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| ConfigError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let ca = read(&files.ca)?;
    require_pem(&files.ca, &ca, "CERTIFICATE")?;
    let client_auth = match (&files.client_cert, &files.client_key) {
        (None, None) => None,
        (Some(cert_path), Some(key_path)) => {
            let cert = read(cert_path)?;
            require_pem(cert_path, &cert, "CERTIFICATE")?;
            let key = read(key_path)?;
            require_pem(key_path, &key, "PRIVATE KEY")?;
            Some((cert, key))
        }
        _ => return Err(ConfigError::ClientCertWithoutKey),
    };
    Ok(TlsMaterial { ca, client_auth })
}

/// A cheap early check that a file is PEM of the right kind (rumqttc parses it fully at connect time;
/// this turns "wrong file" into a start-up error instead of a reconnect loop).
fn require_pem(
    path: &std::path::Path,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), ConfigError> {
    let text = String::from_utf8_lossy(bytes);
    // "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY" (PKCS#1, SEC1).
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{what}-----")));
    if found {
        Ok(())
    } else {
        Err(ConfigError::TlsPem {
            path: path.to_owned(),
            what,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> UplinkConfig {
        UplinkConfig::new(url, "gw-1", "phg/v1/gw-1/status")
    }

    #[test]
    fn uplink_config_loopback_plaintext_is_fine() {
        for url in [
            "mqtt://127.0.0.1:1883",
            "mqtt://localhost",
            "mqtt://[::1]:1884",
            "mqtt://127.0.0.2/",
        ] {
            let c = cfg(url).validate().unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!c.is_tls());
        }
        let c = cfg("mqtt://localhost").validate().unwrap();
        assert_eq!((c.host(), c.port()), ("localhost", 1883));
        let c = cfg("mqtt://[::1]:1884").validate().unwrap();
        assert_eq!((c.host(), c.port()), ("::1", 1884));
    }

    #[test]
    fn uplink_config_plaintext_to_remote_host_is_refused_naming_the_setting() {
        for url in [
            "mqtt://broker.example.com:1883",
            "mqtt://10.0.0.5",
            "mqtt://[2001:db8::1]:1883",
        ] {
            let err = cfg(url).validate().unwrap_err();
            assert!(
                matches!(err, ConfigError::PlaintextRefused { .. }),
                "{url}: {err}"
            );
            assert!(err.to_string().contains("allow_plaintext"), "{err}");
        }
        let mut c = cfg("mqtt://broker.example.com:1883");
        c.allow_plaintext = true;
        c.validate().unwrap();
    }

    #[test]
    fn uplink_config_bad_urls() {
        for url in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://h:x",
            "mqtt://u:p@h:1",
            "mqtt://h:1/path",
            "mqtt://[::1",
            "h:1883",
        ] {
            assert!(
                matches!(cfg(url).validate(), Err(ConfigError::BrokerUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn uplink_config_tls_rules() {
        assert!(matches!(
            cfg("mqtts://h").validate(),
            Err(ConfigError::MqttsWithoutCa)
        ));
        let mut c = cfg("mqtt://127.0.0.1");
        c.tls = Some(TlsFiles {
            ca: "/nonexistent".into(),
            client_cert: None,
            client_key: None,
        });
        assert!(matches!(c.validate(), Err(ConfigError::TlsWithPlainUrl)));

        let dir = std::env::temp_dir().join(format!("phg-uplink-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let key = dir.join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();

        let mut c = cfg("mqtts://broker.example.com");
        c.tls = Some(TlsFiles {
            ca: ca.clone(),
            client_cert: None,
            client_key: None,
        });
        let checked = c.validate().unwrap();
        assert!(checked.is_tls());
        assert_eq!(checked.port(), 8883);

        c.tls = Some(TlsFiles {
            ca: ca.clone(),
            client_cert: Some(ca.clone()),
            client_key: None,
        });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ClientCertWithoutKey)
        ));
        c.tls = Some(TlsFiles {
            ca: ca.clone(),
            client_cert: Some(ca.clone()),
            client_key: Some(key),
        });
        c.validate().unwrap();
        c.tls = Some(TlsFiles {
            ca: junk,
            client_cert: None,
            client_key: None,
        });
        assert!(matches!(c.validate(), Err(ConfigError::TlsPem { .. })));
        c.tls = Some(TlsFiles {
            ca: dir.join("missing.pem"),
            client_cert: None,
            client_key: None,
        });
        assert!(matches!(c.validate(), Err(ConfigError::TlsFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uplink_config_bounds() {
        let mut c = cfg("mqtt://127.0.0.1");
        c.inflight = 0;
        assert!(matches!(c.validate(), Err(ConfigError::ZeroInflight)));
        let mut c = cfg("mqtt://127.0.0.1");
        c.keep_alive = Duration::from_secs(1);
        assert!(matches!(c.validate(), Err(ConfigError::KeepAlive(_))));
        let mut c = cfg("mqtt://127.0.0.1");
        c.backoff_min = Duration::from_secs(2);
        c.backoff_max = Duration::from_secs(1);
        assert!(matches!(c.validate(), Err(ConfigError::Backoff { .. })));
        let mut c = cfg("mqtt://127.0.0.1");
        c.status_topic = "phg/+/status".into();
        assert!(matches!(c.validate(), Err(ConfigError::StatusTopic(_))));
        let mut c = cfg("mqtt://127.0.0.1");
        c.client_id.clear();
        assert!(matches!(c.validate(), Err(ConfigError::EmptyClientId)));
        let mut c = cfg("mqtt://127.0.0.1");
        c.password = Some(Secret::new("pw"));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::PasswordWithoutUsername)
        ));
    }

    #[test]
    fn uplink_config_password_is_redacted() {
        let mut c = cfg("mqtt://127.0.0.1");
        c.username = Some("gw".into());
        c.password = Some(Secret::new("hunter2"));
        let shown = format!("{c:?} {:?}", c.validate().unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"));
    }
}
