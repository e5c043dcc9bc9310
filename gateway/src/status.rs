//! `gateway status`: the running gateway answers on a Unix socket in its state directory (mode 0660, so
//! the service's group may ask) with one JSON [`Report`] per connection — broker link, journal backlog,
//! devices' last sessions, the configuration version in force, open edge-alert episode counts, tasks
//! that stopped checking in — and whether that is healthy. No patient data: ids, values and names never
//! appear; devices are named by their address or simulated id.
//!
//! The gateway decides health (it knows its thresholds, `[status]`); [`ask`] only reads the answer, so a
//! script and a person see the same verdict.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::alerts::EdgeAlerts;
use crate::config::Config;
use crate::journal::Journal;
use crate::liveness::Liveness;
use crate::sources::ble::{AdapterState, BleStatusHandle};
use crate::sources::simulator::unix_now;

/// The report's schema name.
pub const SCHEMA: &str = "phg.gateway-status/1";

/// The broker link as the uplink last reported it; cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkState(Arc<Mutex<Link>>);

#[derive(Debug, Clone, Copy)]
struct Link {
    connected: bool,
    /// When `connected` last changed (at start: the start), Unix ms: a threshold of a few seconds is
    /// not rounded to whole ones.
    since_ms: i64,
    last_puback: Option<i64>,
}

impl Default for LinkState {
    fn default() -> Self {
        LinkState(Arc::new(Mutex::new(Link {
            connected: false,
            since_ms: unix_now_ms(),
            last_puback: None,
        })))
    }
}

impl LinkState {
    /// A CONNACK came.
    pub fn connected(&self) {
        let mut l = self.lock();
        if !l.connected {
            l.connected = true;
            l.since_ms = unix_now_ms();
        }
    }

    /// The connection is gone (or never came: the start counts as the moment it was lost).
    pub fn disconnected(&self) {
        let mut l = self.lock();
        if l.connected {
            l.connected = false;
            l.since_ms = unix_now_ms();
        }
    }

    /// A record was PUBACKed.
    pub fn puback(&self) {
        self.lock().last_puback = Some(unix_now());
    }

    fn get(&self) -> Link {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Link> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the gateway's tasks report as they run, for the status.
#[derive(Debug, Default)]
pub struct Live {
    /// The broker link.
    pub link: LinkState,
    config_version: Mutex<Option<u64>>,
    sessions: Mutex<BTreeMap<String, DeviceReport>>,
}

impl Live {
    /// The CRM configuration version now in force.
    pub fn set_config_version(&self, version: Option<u64>) {
        *self
            .config_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = version;
    }

    /// A (simulated) device's session ended: `outcome` is `complete` or what went wrong.
    pub fn record_session(&self, device: &str, outcome: impl Into<String>) {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                device.to_owned(),
                DeviceReport {
                    id: device.to_owned(),
                    last_session: protocol::wire::rfc3339_utc(unix_now()),
                    outcome: outcome.into(),
                    // The simulated devices have no battery.
                    battery_percent: None,
                },
            );
    }
}

/// What the status server reads from.
#[derive(Debug)]
pub struct Sources {
    /// The journal (depth, the oldest waiting record).
    pub journal: Arc<Mutex<Journal>>,
    /// What the tasks report.
    pub live: Arc<Live>,
    /// Which tasks check in.
    pub liveness: Liveness,
    /// The BLE source's adapter.
    pub ble_status: BleStatusHandle,
    /// The edge alert engine, when on.
    pub alerts: Option<Arc<EdgeAlerts>>,
}

/// The status, as the socket serves it (`gateway status --json` prints it as is).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    /// The gateway's version.
    pub version: String,
    /// The gateway id.
    pub gateway_id: String,
    /// When the report was made, RFC 3339 UTC.
    pub time: String,
    /// No problem below.
    pub healthy: bool,
    /// What is wrong, in words (empty when healthy).
    pub problems: Vec<String>,
    /// The broker link.
    pub broker: BrokerReport,
    /// The journal's backlog.
    pub journal: JournalReport,
    /// The Bluetooth adapter (`up`, `missing: why`, `unknown`); absent without `[ble]`.
    pub adapter: Option<String>,
    /// Each device's last session.
    pub devices: Vec<DeviceReport>,
    /// The CRM configuration version in force (absent: the configuration file's bindings).
    pub config_version: Option<u64>,
    /// Edge alerts; absent when off.
    pub alerts: Option<AlertsReport>,
    /// Tasks that have not checked in within the watchdog's interval.
    pub stale_tasks: Vec<String>,
}

/// The broker link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerReport {
    /// Connected now.
    pub connected: bool,
    /// Connected (or not) since, RFC 3339 UTC.
    pub since: Option<String>,
    /// For how long, seconds.
    pub for_s: u64,
    /// The last PUBACK, RFC 3339 UTC.
    pub last_puback: Option<String>,
}

/// The journal's backlog.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalReport {
    /// Records waiting for the broker.
    pub depth: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// The bounds (`[journal]`).
    pub max_records: u64,
    /// The bounds (`[journal]`).
    pub max_bytes: u64,
    /// At a bound: downloads stop.
    pub full: bool,
    /// How long the oldest waiting record has waited, seconds (from its receive time; absent when the
    /// journal is empty).
    pub oldest_waiting_s: Option<u64>,
}

/// A device's last session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The Bluetooth address or simulated device id.
    pub id: String,
    /// When its last session ended, RFC 3339 UTC (absent: none yet).
    pub last_session: Option<String>,
    /// `complete`, or the stage and cause of the failure.
    pub outcome: String,
    /// The battery level last read (Bluetooth devices with a Battery Service), percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_percent: Option<u8>,
}

/// Edge alerts: counts only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertsReport {
    /// Open episodes by severity.
    pub open_episodes: BTreeMap<String, u64>,
    /// Alerts waiting for a confirming reading.
    pub pending_confirmations: u64,
}

/// Serves the status socket until `stop`. `None` (logged) when the socket cannot be made: the gateway
/// runs on without it.
pub fn serve(
    config: &Config,
    sources: Sources,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let raw = &config.raw;
    let path = raw.status.socket_path(&raw.journal.dir);
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %path.display(), error = %e, "cannot serve the status socket; `gateway status` will report the gateway as not running");
            return None;
        }
    };
    let ctx = Arc::new(Context {
        sources,
        gateway_id: raw.gateway_id.clone(),
        broker_down_s: raw.status.broker_down_s,
        ble: raw.ble.is_some(),
    });
    Some(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                c = listener.accept() => c,
            };
            match conn {
                Ok((mut stream, _)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        let report = match tokio::task::spawn_blocking(move || ctx.report()).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "status report failed");
                                return;
                            }
                        };
                        let mut body = serde_json::to_vec(&report).unwrap_or_default();
                        body.push(b'\n');
                        let _ = stream.write_all(&body).await;
                        let _ = stream.shutdown().await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "status socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// Binds `path` (replacing a socket a previous run left behind) with mode 0660.
fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

#[derive(Debug)]
struct Context {
    sources: Sources,
    gateway_id: String,
    broker_down_s: u64,
    ble: bool,
}

impl Context {
    /// The report now. Blocking: it takes the journal's lock and reads its oldest record.
    fn report(&self) -> Report {
        let now = unix_now();
        let s = &self.sources;
        let mut problems = Vec::new();

        let link = s.live.link.get();
        let link_for_ms = u64::try_from(unix_now_ms().saturating_sub(link.since_ms)).unwrap_or(0);
        let link_for = link_for_ms / 1000;
        let journal = {
            let j = s.journal.lock().unwrap_or_else(|p| p.into_inner());
            let cfg = j.config();
            let (depth, pending_bytes) = (j.depth(), j.pending_bytes());
            let oldest = j
                .pending(None, 1)
                .ok()
                .and_then(|r| r.into_iter().next())
                .and_then(|r| received_at(&r.payload));
            JournalReport {
                depth,
                pending_bytes,
                max_records: cfg.max_records,
                max_bytes: cfg.max_bytes,
                full: depth >= cfg.max_records || pending_bytes >= cfg.max_bytes,
                oldest_waiting_s: oldest.map(|t| u64::try_from(now - t).unwrap_or(0)),
            }
        };
        if !link.connected
            && journal.depth > 0
            && link_for_ms >= self.broker_down_s.saturating_mul(1000)
        {
            problems.push(format!(
                "the broker has been unreachable for {link_for} s with {} records waiting",
                journal.depth
            ));
        }
        if journal.full {
            problems.push("the journal is full: downloads are stopped".to_owned());
        }

        let ble = s.ble_status.snapshot();
        let adapter = self.ble.then(|| match &ble.adapter {
            AdapterState::Unknown => "unknown".to_owned(),
            AdapterState::Up { name } => format!("up ({name})"),
            AdapterState::Missing { cause } => {
                problems.push(format!("the Bluetooth adapter is missing: {cause}"));
                format!("missing: {cause}")
            }
        });
        let mut devices: Vec<DeviceReport> = s
            .live
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for (address, st) in &ble.devices {
            let (last, outcome) = match (&st.last_failure, st.last_success) {
                (Some(f), _) => (Some(f.at), format!("failed at {}: {}", f.stage, f.cause)),
                (None, Some(t)) => (Some(t), "complete".to_owned()),
                (None, None) => (None, "no session yet".to_owned()),
            };
            devices.push(DeviceReport {
                id: address.clone(),
                last_session: last.and_then(protocol::wire::rfc3339_utc),
                outcome,
                battery_percent: st.battery.map(|b| b.percent),
            });
        }

        let alerts = s.alerts.as_ref().map(|a| {
            let (by_severity, pending) = a.open_counts();
            AlertsReport {
                open_episodes: by_severity
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                pending_confirmations: pending,
            }
        });

        let stale_tasks: Vec<String> = s.liveness.stale().into_iter().map(|(n, _)| n).collect();
        if !stale_tasks.is_empty() {
            problems.push(format!("tasks not checking in: {}", stale_tasks.join(", ")));
        }

        Report {
            schema: SCHEMA.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            gateway_id: self.gateway_id.clone(),
            time: protocol::wire::rfc3339_utc(now).unwrap_or_default(),
            healthy: problems.is_empty(),
            problems,
            broker: BrokerReport {
                connected: link.connected,
                since: protocol::wire::rfc3339_utc(link.since_ms.div_euclid(1000)),
                for_s: link_for,
                last_puback: link.last_puback.and_then(protocol::wire::rfc3339_utc),
            },
            journal,
            adapter,
            devices,
            config_version: *s
                .live
                .config_version
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            alerts,
            stale_tasks,
        }
    }
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// When a journaled message was received: a reading's `time.received` (its body is flattened into the
/// message), an event's `time`.
fn received_at(payload: &[u8]) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let time = v.get("time")?;
    let t = time.get("received").unwrap_or(time).as_str()?;
    protocol::wire::parse_rfc3339_utc(t)
}

/// Why [`ask`] got no report.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Nothing listens on the socket: the gateway is not running (or runs with another state directory).
    #[error("the gateway is not running (nothing answers on {0})")]
    NotRunning(PathBuf),
    /// The socket is there but this user may not connect (not in the service's group).
    #[error("not allowed to ask the gateway ({0}): run as root or as a member of group phg")]
    Denied(PathBuf),
    /// Anything else.
    #[error("cannot read the status from {path}: {why}")]
    Failed {
        /// The socket.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Asks the gateway listening on `socket` for its report.
///
/// # Errors
/// [`AskError`].
pub fn ask(socket: &Path) -> Result<Report, AskError> {
    use std::io::Read;
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                AskError::NotRunning(socket.to_owned())
            }
            std::io::ErrorKind::PermissionDenied => AskError::Denied(socket.to_owned()),
            _ => AskError::Failed {
                path: socket.to_owned(),
                why: e.to_string(),
            },
        })?;
    let failed = |why: String| AskError::Failed {
        path: socket.to_owned(),
        why,
    };
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| failed(e.to_string()))?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .map_err(|e| failed(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| failed(format!("not a status report: {e}")))
}

impl Report {
    /// The report for a person.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "gateway {} (version {}): {}",
            self.gateway_id,
            self.version,
            if self.healthy { "healthy" } else { "UNHEALTHY" }
        );
        for p in &self.problems {
            let _ = writeln!(o, "  problem: {p}");
        }
        let b = &self.broker;
        let _ = writeln!(
            o,
            "broker:   {} since {} ({}); last PUBACK {}",
            if b.connected {
                "connected"
            } else {
                "not connected"
            },
            b.since.as_deref().unwrap_or("?"),
            human_duration(b.for_s),
            b.last_puback.as_deref().unwrap_or("never (this run)")
        );
        let j = &self.journal;
        let _ = writeln!(
            o,
            "journal:  {} waiting ({} bytes; bounds {} records, {} bytes){}{}",
            j.depth,
            j.pending_bytes,
            j.max_records,
            j.max_bytes,
            j.oldest_waiting_s
                .map(|s| format!(", oldest waiting {}", human_duration(s)))
                .unwrap_or_default(),
            if j.full { ", FULL" } else { "" }
        );
        if let Some(a) = &self.adapter {
            let _ = writeln!(o, "adapter:  {a}");
        }
        let _ = writeln!(
            o,
            "config:   {}",
            self.config_version.map_or_else(
                || "the configuration file's bindings (no CRM configuration yet)".to_owned(),
                |v| format!("CRM configuration version {v}")
            )
        );
        if let Some(a) = &self.alerts {
            let open: Vec<String> = a
                .open_episodes
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            let _ = writeln!(
                o,
                "alerts:   {} open episodes{}; {} waiting for confirmation",
                a.open_episodes.values().sum::<u64>(),
                if open.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", open.join(", "))
                },
                a.pending_confirmations
            );
        }
        if self.devices.is_empty() {
            let _ = writeln!(o, "devices:  none yet");
        }
        for d in &self.devices {
            let _ = writeln!(
                o,
                "device:   {}  last session {}  {}{}",
                d.id,
                d.last_session.as_deref().unwrap_or("never"),
                d.outcome,
                d.battery_percent
                    .map_or(String::new(), |b| format!("  battery {b} %"))
            );
        }
        if !self.stale_tasks.is_empty() {
            let _ = writeln!(o, "stale:    {}", self.stale_tasks.join(", "));
        }
        o
    }
}

fn human_duration(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_at_reads_readings_and_events() {
        let reading = br#"{"schema":"phg.reading/1","time":{"device":"2026-12-05T08:00:00","received":"2026-12-05T08:03:11Z"}}"#;
        assert_eq!(received_at(reading), Some(1_796_457_791));
        let event = br#"{"schema":"phg.event/1","time":"2026-12-05T08:03:11Z","event":{}}"#;
        assert_eq!(received_at(event), Some(1_796_457_791));
        assert_eq!(received_at(b"not json"), None);
    }
}
