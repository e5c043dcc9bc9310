//! Synthetic readings in a real journal, a running uplink, and the checks on what a subscriber got.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::journal::{Journal, JournalConfig, NewRecord};
use gateway::pipeline::handoff::Handoff;
use gateway::uplink::{self, MqttVersion, UplinkConfig, UplinkError, UplinkStats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Received;

/// The gateway id the scenarios use.
pub const GATEWAY: &str = "gw-test";
/// Where the scenarios' readings go.
pub const READINGS_TOPIC: &str = "phg/v1/gw-test/readings";
/// The scenarios' status topic.
pub const STATUS_TOPIC: &str = "phg/v1/gw-test/status";
/// The online status payload.
pub const ONLINE: &[u8] = br#"{"schema":"phg.status/1","state":"online"}"#;
/// The offline status payload (the last will).
pub const OFFLINE: &[u8] = br#"{"schema":"phg.status/1","state":"offline"}"#;

/// Reading number `n` of `device`: its id is `device:n`, and the payload carries all three, so a
/// subscriber can check completeness, order per device and that a duplicate is the same reading.
pub fn reading(device: &str, n: u64) -> NewRecord {
    let id = format!("{device}:{n}");
    let payload = serde_json::json!({ "schema": "phg.test/1", "id": id, "device": device, "n": n });
    NewRecord {
        device: device.to_owned(),
        device_seq: Some(n),
        reading_id: id,
        topic: READINGS_TOPIC.to_owned(),
        payload: payload.to_string().into_bytes(),
    }
}

/// Opens a journal in `dir` with the default bounds.
///
/// # Errors
///
/// The journal's own.
pub fn open_journal(dir: &Path) -> io::Result<Arc<Mutex<Journal>>> {
    let (journal, _recovery) = Journal::open(JournalConfig::new(dir)).map_err(io::Error::other)?;
    Ok(Arc::new(Mutex::new(journal)))
}

/// Appends readings `from..to` of every device, interleaved (device order inside each number), in group
/// commits of at most 64.
///
/// # Errors
///
/// The journal's own, or a poisoned lock.
pub fn append_readings(
    journal: &Mutex<Journal>,
    devices: &[&str],
    from: u64,
    to: u64,
) -> io::Result<()> {
    let all: Vec<NewRecord> = (from..to)
        .flat_map(|n| devices.iter().map(move |d| reading(d, n)))
        .collect();
    let mut j = journal
        .lock()
        .map_err(|_| io::Error::other("journal lock poisoned"))?;
    for batch in all.chunks(64) {
        j.append(batch).map_err(io::Error::other)?;
    }
    Ok(())
}

/// The journal's depth.
///
/// # Errors
///
/// A poisoned lock.
pub fn depth(journal: &Mutex<Journal>) -> io::Result<u64> {
    Ok(journal
        .lock()
        .map_err(|_| io::Error::other("journal lock poisoned"))?
        .depth())
}

/// Waits until the journal's depth is `want` (true) or `timeout` passed (false).
pub async fn wait_for_depth(journal: &Mutex<Journal>, want: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if depth(journal).ok() == Some(want) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An uplink configuration for a test broker: fast backoff, short grace.
pub fn uplink_config(broker_url: &str, version: MqttVersion) -> UplinkConfig {
    let mut cfg = UplinkConfig::new(broker_url, crate::unique_id(GATEWAY), STATUS_TOPIC);
    cfg.mqtt_version = version;
    cfg.online_payload = ONLINE.to_vec();
    cfg.offline_payload = OFFLINE.to_vec();
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(400);
    cfg.shutdown_grace = Duration::from_secs(2);
    cfg.keep_alive = Duration::from_secs(5);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

/// An uplink task and its handles.
#[derive(Debug)]
pub struct RunningUplink {
    /// Wake the uplink after appending (`Handoff::wake`: it reads the journal).
    pub wake: Arc<Handoff>,
    /// Cancel to shut it down gracefully.
    pub shutdown: CancellationToken,
    /// The task.
    pub task: JoinHandle<Result<UplinkStats, UplinkError>>,
}

impl RunningUplink {
    /// Spawns [`uplink::run`].
    pub fn spawn(cfg: UplinkConfig, journal: Arc<Mutex<Journal>>) -> Self {
        let wake = Arc::new(Handoff::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(uplink::run(
            cfg,
            journal,
            Arc::clone(&wake),
            shutdown.clone(),
        ));
        Self {
            wake,
            shutdown,
            task,
        }
    }

    /// Graceful shutdown; returns the uplink's result.
    ///
    /// # Errors
    ///
    /// The task panicked or was aborted.
    pub async fn stop(self) -> io::Result<Result<UplinkStats, UplinkError>> {
        self.shutdown.cancel();
        self.task.await.map_err(io::Error::other)
    }
}

/// What a subscriber got on the readings topic, per device.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Per device, the reading numbers in order of *first* arrival.
    pub first_seen: BTreeMap<String, Vec<u64>>,
    /// Messages that repeated a reading id already seen.
    pub duplicates: usize,
    /// Duplicates whose payload differed from the first copy (must be 0: same id, same reading).
    pub inconsistent_duplicates: usize,
    /// Messages on the readings topic.
    pub total: usize,
    /// Payloads that were not a test reading.
    pub garbage: usize,
}

impl Delivery {
    /// Analyses the readings among `received`.
    pub fn of(received: &[Received]) -> Self {
        let mut d = Delivery::default();
        let mut seen: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for m in received.iter().filter(|m| m.topic == READINGS_TOPIC) {
            d.total += 1;
            let parsed: Option<(String, String, u64)> =
                serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .ok()
                    .and_then(|v| {
                        Some((
                            v.get("id")?.as_str()?.to_owned(),
                            v.get("device")?.as_str()?.to_owned(),
                            v.get("n")?.as_u64()?,
                        ))
                    });
            let Some((id, device, n)) = parsed else {
                d.garbage += 1;
                continue;
            };
            match seen.get(&id) {
                Some(first) => {
                    d.duplicates += 1;
                    if *first != m.payload {
                        d.inconsistent_duplicates += 1;
                    }
                }
                None => {
                    seen.insert(id, m.payload.clone());
                    d.first_seen.entry(device).or_default().push(n);
                }
            }
        }
        d
    }

    /// Distinct readings received.
    pub fn distinct(&self) -> usize {
        self.first_seen.values().map(Vec::len).sum()
    }

    /// Checks that each `(device, count)` got exactly readings `0..count`, first occurrences in order,
    /// and that every duplicate is byte-identical to its first copy. Returns the first problem found.
    pub fn check_complete_in_order(&self, expected: &[(&str, u64)]) -> Result<(), String> {
        if self.garbage > 0 || self.inconsistent_duplicates > 0 {
            return Err(format!(
                "{} unparseable payloads, {} duplicates that differ from the first copy",
                self.garbage, self.inconsistent_duplicates
            ));
        }
        for &(device, count) in expected {
            let got = self
                .first_seen
                .get(device)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let want: Vec<u64> = (0..count).collect();
            if got != want.as_slice() {
                let missing = want.iter().filter(|n| !got.contains(n)).count();
                let out_of_order = got.windows(2).filter(|w| w[0] >= w[1]).count();
                return Err(format!(
                    "device {device}: {} distinct of {count}, {missing} missing, {out_of_order} out of order",
                    got.len()
                ));
            }
        }
        if self.first_seen.len() != expected.len() {
            return Err(format!(
                "readings from unexpected devices: {:?}",
                self.first_seen.keys()
            ));
        }
        Ok(())
    }
}
