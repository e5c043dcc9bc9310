//! Gateway pipeline benchmark: prints figures, asserts nothing.
//!
//! ```text
//! cargo bench -p phg-tests --bench pipeline               # full sizes (100 000 messages / readings)
//! cargo bench -p phg-tests --bench pipeline -- --quick    # smoke run (10 000; PHG_BENCH_QUICK=1 too)
//! ```
//!
//! One run, one local broker (Mosquitto through `TestBroker`, started with `max_inflight_messages 100`
//! so that an MQTT 5 client's receive-maximum is the gateway's window of 100; the embedded rumqttd,
//! labelled, when Mosquitto is absent):
//!
//! - (a) the ceiling: raw rumqttc QoS 1 publishing, window 100, every PUBACK awaited → messages/s;
//! - (b) the gateway path: pre-generated 2A18 glucose values from several devices (one task each) →
//!   `SessionSink::value` (decode, validate, attribute, reading id, journal group commit with fsync) →
//!   the real uplink (publish, PUBACK, journal ack) until the journal is empty → readings/s;
//! - (c) latency at a steady 100 readings/s: accepted → PUBACK, next to a raw publish round trip;
//! - (d) RSS around (b); (e) journal bytes (and block-device bytes) written per reading;
//! - (f) idle: the real `gateway run` process, connected, no device, a journal that never held a record
//!   → share of one core over 10 s (5 s with `--quick`), from `/proc/PID/stat` (DESIGN.md promise 10:
//!   under 1 %).
//!
//! Options: `--quick` / `PHG_BENCH_QUICK=1` (smaller sizes); `--broker-defaults` /
//! `PHG_BENCH_BROKER_DEFAULTS=1` (Mosquitto as `TestBroker::start` configures it: receive-maximum 20).
//! Profiling aids: `PHG_BENCH_BROKER_EXTRA="set_tcp_nodelay true"` (more Mosquitto config lines),
//! `PHG_BENCH_TRACE_B=FILE` (the uplink's per-record events of (b), with times, to FILE),
//! `PHG_BENCH_TRACE_C=FILE` (per reading of (c): accepted, published, PUBACKed, in ms).
//!
//! Setup failures end the run with a message (`expect` on setup is deliberate); broker and journal
//! results are matched, never unwrapped.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway::journal::{Journal, JournalConfig, MAX_RECORDS_LIMIT};
use gateway::pipeline::handoff::Handoff;
use gateway::pipeline::{Bindings, Counters, Pipeline, writer};
use gateway::sources::collector::{DeviceRef, RecordSink, SessionInfo};
use gateway::sources::uuid::GLUCOSE_MEASUREMENT;
use gateway::uplink::{self, MqttVersion, UplinkConfig, UplinkError, UplinkStats};
use phg_tests::process::service_environment;
use phg_tests::{BrokerKind, TestBroker, mosquitto_path, unique_id};
use protocol::gatt::Codec;
use protocol::gatt::glucose::{
    Concentration, ConcentrationUnit, GlucoseMeasurement, SampleLocation, SampleType, SensorStatus,
};
use protocol::gatt::time::DateTime;
use protocol::ieee11073::SFloat;
use protocol::model::{GlucoseRecord, Measurement};
use protocol::wire::{StatusMessage, Topics};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

/// The gateway's in-flight window (`UplinkConfig::inflight` default), used for the raw ceiling too.
const WINDOW: u16 = 100;
/// Payload of the raw ceiling run (a).
const RAW_PAYLOAD: usize = 200;
const GATEWAY_ID: &str = "gw-bench";
/// Mosquitto line that makes its MQTT 5 receive-maximum equal to the gateway's window (default: 20).
const BROKER_EXTRA: &str = "max_inflight_messages 100";

// ---------------------------------------------------------------------------------------------------------
// Sizes and options
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sizes {
    quick: bool,
    /// (a): messages per raw run.
    raw_messages: usize,
    /// (b): devices (one feeding task each) × values per device.
    devices: usize,
    per_device: usize,
    /// (c): readings fed at `rate_hz`.
    latency_readings: usize,
    rate_hz: u32,
    /// Run against Mosquitto's default configuration (MQTT 5 receive-maximum 20) instead.
    broker_defaults: bool,
}

impl Sizes {
    fn from_args() -> Self {
        // `cargo bench` passes `--bench`; anything unknown is ignored.
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env_on = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
        let quick = args.iter().any(|a| a == "--quick") || env_on("PHG_BENCH_QUICK");
        let broker_defaults =
            args.iter().any(|a| a == "--broker-defaults") || env_on("PHG_BENCH_BROKER_DEFAULTS");
        if quick {
            Sizes {
                quick,
                raw_messages: 10_000,
                // Issue 15's memory goal is stated for 10 devices.
                devices: 10,
                per_device: 1_000,
                latency_readings: 300,
                rate_hz: 100,
                broker_defaults,
            }
        } else {
            Sizes {
                quick,
                raw_messages: 100_000,
                devices: 10,
                per_device: 10_000,
                latency_readings: 2_000,
                rate_hz: 100,
                broker_defaults,
            }
        }
    }

    fn readings(&self) -> usize {
        self.devices * self.per_device
    }
}

// ---------------------------------------------------------------------------------------------------------
// Capturing the uplink's own events (its PUBACK moment per journal seq)
// ---------------------------------------------------------------------------------------------------------

/// The uplink logs `debug!(seq, pkid, "record published")` when rumqttc reports the publish written
/// (`Outgoing::Publish`) and `debug!(seq, pkid, "record PUBACKed")` when it handles the PUBACK. A
/// tracing layer records those with their `Instant`: the only place the PUBACK of one journal record is
/// visible from outside the uplink. Debug events are enabled (dynamically) only while `ENABLED` is set,
/// so the throughput run does not pay for them.
mod capture {
    use std::fmt::Write as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{LevelFilter, dynamic_filter_fn};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    /// Capture per-record events.
    pub static ENABLED: AtomicBool = AtomicBool::new(false);
    /// "uplink connected" events seen (always counted: info level, once per connection).
    pub static CONNECTS: AtomicU64 = AtomicU64::new(0);
    static EVENTS: Mutex<Vec<(What, u64, Instant)>> = Mutex::new(Vec::new());

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum What {
        Published,
        PubAcked,
    }

    struct CaptureLayer;

    #[derive(Default)]
    struct Fields {
        message: String,
        seq: Option<u64>,
    }

    impl Visit for Fields {
        fn record_u64(&mut self, field: &Field, value: u64) {
            if field.name() == "seq" {
                self.seq = Some(value);
            }
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.message.push_str(value);
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.message, "{value:?}");
            }
        }
    }

    impl<S: Subscriber> Layer<S> for CaptureLayer {
        fn on_event(&self, event: &Event<'_>, _cx: Context<'_, S>) {
            let now = Instant::now();
            let mut f = Fields::default();
            event.record(&mut f);
            let what = match f.message.as_str() {
                "uplink connected" => {
                    CONNECTS.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                "record published" => What::Published,
                "record PUBACKed" => What::PubAcked,
                _ => return,
            };
            if let (true, Some(seq)) = (ENABLED.load(Ordering::Relaxed), f.seq) {
                EVENTS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((what, seq, now));
            }
        }
    }

    /// Installs the capture layer and a WARN-level log to stderr (uplink warnings show up in the run).
    pub fn install() {
        let uplink_events = dynamic_filter_fn(|meta, _cx| {
            meta.target().starts_with("gateway::uplink")
                && (*meta.level() <= Level::INFO || ENABLED.load(Ordering::Relaxed))
        });
        let subscriber = tracing_subscriber::registry()
            .with(CaptureLayer.with_filter(uplink_events))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(LevelFilter::WARN),
            );
        // Not `init()`: that would also route the `log` crate (rumqttc) into tracing.
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            eprintln!("bench: a tracing subscriber was already set; PUBACK capture unavailable");
        }
    }

    pub fn start() {
        EVENTS.lock().unwrap_or_else(|p| p.into_inner()).clear();
        ENABLED.store(true, Ordering::SeqCst);
    }

    pub fn stop() -> Vec<(What, u64, Instant)> {
        ENABLED.store(false, Ordering::SeqCst);
        std::mem::take(&mut *EVENTS.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Inputs: realistic 2A18 values, pre-generated
// ---------------------------------------------------------------------------------------------------------

/// One 2A18 value, inline (no allocation per value: keeps the inputs' share of the RSS small).
#[derive(Debug, Clone, Copy)]
struct Value {
    len: u8,
    bytes: [u8; GlucoseMeasurement::MAX_LEN],
}

impl Value {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// xorshift64*: deterministic glucose values without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `count` stored records of one meter, 5 minutes apart, the newest a minute ago: mg/dL 70–249 as GLS
/// sends it (kg/L, exponent −5), time offset 0, capillary plasma from a finger, every 500th with the
/// battery-low annunciation (a flag, not a rejection). All valid and attributable.
fn glucose_values(device_index: usize, count: usize, now: i64) -> Vec<Value> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (device_index as u64 + 1));
    (0..count)
        .map(|i| {
            let seq = u16::try_from(i)
                .expect("GLS sequence numbers are u16: at most 65 536 records per device");
            let age_s = 60 + 300 * i64::try_from(count - 1 - i).expect("count fits i64");
            let base_time = DateTime::from_epoch_seconds(now - age_s)
                .expect("a recent time is a valid DateTime");
            let mg_dl = 70 + i32::try_from(rng.next() % 180).expect("< 180");
            let m = GlucoseMeasurement {
                time_offset_min: Some(0),
                concentration: Some(Concentration {
                    value: SFloat::new(mg_dl, -5).expect("mg/dL as kg/L fits an SFLOAT"),
                    unit: ConcentrationUnit::KgPerL,
                    sample_type: SampleType::CAPILLARY_PLASMA,
                    sample_location: SampleLocation::FINGER,
                }),
                sensor_status: (i % 500 == 499).then_some(SensorStatus::DEVICE_BATTERY_LOW),
                ..GlucoseMeasurement::new(seq, base_time)
            };
            let v = m.to_vec();
            let mut bytes = [0u8; GlucoseMeasurement::MAX_LEN];
            let n = v.len().min(bytes.len());
            bytes[..n].copy_from_slice(&v[..n]);
            Value {
                len: u8::try_from(n).expect("≤ 17 octets"),
                bytes,
            }
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn session_info(device: &str) -> SessionInfo {
    SessionInfo {
        device: DeviceRef {
            id: device.to_owned(),
            model: Some("Bench GL".to_owned()),
            numbering: Default::default(),
        },
        clock_offset_s: Some(0),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Process and disk figures
// ---------------------------------------------------------------------------------------------------------

/// A `/proc/self/status` field in kB (`VmRSS`, `VmHWM`).
fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0: `5` in `clear_refs`).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The block device holding `path`: its name and its `stat` file.
fn block_device_of(path: &Path) -> Option<(String, PathBuf)> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    if major == 0 {
        return None; // tmpfs, overlay: no block device
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let name = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("{major}:{minor}"));
    let stat = sys.join("stat");
    stat.is_file().then_some((name, stat))
}

/// Sectors written (field 7 of the block device's `stat`; 512-byte units whatever the device).
fn sectors_written(stat: &Path) -> Option<u64> {
    std::fs::read_to_string(stat)
        .ok()?
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()
}

fn sync_all() {
    let _ = Command::new("sync").status();
}

// ---------------------------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------------------------

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Clone, Copy)]
struct Dist {
    n: usize,
    min: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Dist {
    /// From milliseconds.
    fn of(mut v: Vec<f64>) -> Dist {
        v.sort_by(f64::total_cmp);
        Dist {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: pct(&v, 50.0),
            p99: pct(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  (min {:.3} ms, n = {})",
            self.p50, self.p99, self.max, self.min, self.n
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `later − earlier` in ms, negative when `later` is before `earlier`.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => ms(d),
        None => -ms(earlier.duration_since(later)),
    }
}

// ---------------------------------------------------------------------------------------------------------
// (a) Raw rumqttc
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct RawRun {
    label: String,
    messages: usize,
    payload: usize,
    elapsed: Duration,
    /// MQTT 5: the broker's CONNACK receive-maximum (`None`: not sent, i.e. 65 535; or MQTT 3.1.1).
    receive_max: Option<u16>,
}

impl RawRun {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

fn host_port(broker: &TestBroker) -> (String, u16) {
    (broker.addr().ip().to_string(), broker.addr().port())
}

/// rumqttc's own in-flight bound and channel size, set the way the gateway's uplink sets them (its
/// `client` module): rumqttc never holds a request, the window below is the only bound.
fn rumqttc_inflight(window: u16) -> u16 {
    window.saturating_add(2).saturating_mul(2)
}

fn net_options() -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true); // as the uplink
    net.set_connection_timeout(5);
    net
}

/// One raw client, MQTT 5 or 3.1.1.
enum Raw {
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

enum RawEvent {
    ConnAck(Option<u16>),
    PubAck,
    Other,
}

impl Raw {
    fn new(broker: &TestBroker, version: MqttVersion, client_id: &str, window: u16) -> Raw {
        let (host, port) = host_port(broker);
        let cap = usize::from(window) + 4;
        match version {
            MqttVersion::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
                o.set_keep_alive(Duration::from_secs(30))
                    .set_clean_start(true)
                    .set_outgoing_inflight_upper_limit(rumqttc_inflight(window))
                    .set_network_options(net_options());
                let (c, el) = rumqttc::v5::AsyncClient::new(o, cap);
                Raw::V5(c, Box::new(el))
            }
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, host, port);
                o.set_keep_alive(Duration::from_secs(30))
                    .set_clean_session(true)
                    .set_inflight(rumqttc_inflight(window));
                let (c, mut el) = rumqttc::AsyncClient::new(o, cap);
                el.set_network_options(net_options());
                Raw::V4(c, Box::new(el))
            }
        }
    }

    fn try_publish(&self, topic: &str, payload: Vec<u8>) -> bool {
        match self {
            Raw::V5(c, _) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .is_ok(),
            Raw::V4(c, _) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .is_ok(),
        }
    }

    async fn poll(&mut self) -> Result<RawEvent, String> {
        match self {
            Raw::V5(_, el) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(c)) => {
                        Ok(RawEvent::ConnAck(c.properties.and_then(|p| p.receive_max)))
                    }
                    Event::Incoming(Packet::PubAck(_)) => Ok(RawEvent::PubAck),
                    _ => Ok(RawEvent::Other),
                }
            }
            Raw::V4(_, el) => {
                use rumqttc::{Event, Packet};
                match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(RawEvent::ConnAck(None)),
                    Event::Incoming(Packet::PubAck(_)) => Ok(RawEvent::PubAck),
                    _ => Ok(RawEvent::Other),
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<Option<u16>, String> {
        loop {
            if let RawEvent::ConnAck(rm) = self.poll().await? {
                return Ok(rm);
            }
        }
    }

    async fn disconnect(mut self) {
        let ok = match &self {
            Raw::V5(c, _) => c.try_disconnect().is_ok(),
            Raw::V4(c, _) => c.try_disconnect().is_ok(),
        };
        if ok {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.poll().await.is_ok() {}
            })
            .await;
        }
    }
}

/// (a): `messages` QoS 1 publishes of `payload` bytes with at most `window` unacknowledged (the uplink's
/// scheme: hand over while the window has room, then drive the event loop), timed from the first
/// publish (after CONNACK) to the last PUBACK.
async fn raw_throughput(
    broker: &TestBroker,
    version: MqttVersion,
    messages: usize,
    payload: usize,
    label: &str,
) -> Result<RawRun, String> {
    let mut raw = Raw::new(broker, version, &unique_id("bench-raw"), WINDOW);
    let receive_max = tokio::time::timeout(Duration::from_secs(10), raw.connect())
        .await
        .map_err(|_| "no CONNACK within 10 s".to_owned())??;
    let body = vec![b'x'; payload];
    let topic = format!("phg/v1/{GATEWAY_ID}/raw");
    let window = usize::from(WINDOW);
    let (mut sent, mut acked) = (0usize, 0usize);
    let t0 = Instant::now();
    let run = async {
        while acked < messages {
            while sent < messages && sent - acked < window {
                if !raw.try_publish(&topic, body.clone()) {
                    break;
                }
                sent += 1;
            }
            if let RawEvent::PubAck = raw.poll().await? {
                acked += 1;
            }
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .map_err(|_| format!("{label}: not done within 300 s"))??;
    let elapsed = t0.elapsed();
    raw.disconnect().await;
    Ok(RawRun {
        label: label.to_owned(),
        messages,
        payload,
        elapsed,
        receive_max,
    })
}

/// (c) reference: one QoS 1 publish at a time, `rate_hz` apart; time from `try_publish` to the PUBACK
/// coming out of the event loop (ms).
async fn raw_round_trips(
    broker: &TestBroker,
    version: MqttVersion,
    count: usize,
    payload: usize,
    rate_hz: u32,
) -> Result<Vec<f64>, String> {
    let mut raw = Raw::new(broker, version, &unique_id("bench-rtt"), WINDOW);
    tokio::time::timeout(Duration::from_secs(10), raw.connect())
        .await
        .map_err(|_| "no CONNACK within 10 s".to_owned())??;
    let body = vec![b'x'; payload];
    let topic = format!("phg/v1/{GATEWAY_ID}/raw-rtt");
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate_hz);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        ticker.tick().await;
        let t = Instant::now();
        if !raw.try_publish(&topic, body.clone()) {
            return Err("raw publish: channel full".into());
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(10), raw.poll()).await {
                Ok(Ok(RawEvent::PubAck)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("no PUBACK within 10 s".into()),
            }
        }
        out.push(ms(t.elapsed()));
    }
    raw.disconnect().await;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------
// The gateway, wired as app.rs wires it (minus the simulated devices and telemetry)
// ---------------------------------------------------------------------------------------------------------

struct Gateway {
    pipeline: Pipeline,
    journal: Arc<Mutex<Journal>>,
    counters: Arc<Counters>,
    writer_thread: std::thread::JoinHandle<()>,
    uplink: tokio::task::JoinHandle<Result<UplinkStats, UplinkError>>,
    stop: CancellationToken,
    dir: tempfile::TempDir,
    devices: Vec<String>,
}

/// A poisoned lock is used anyway (as the gateway does: the journal's own framing keeps it consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Journal in a fresh temp dir (bounds raised so that N readings always fit: the run measures
/// throughput, not the journal-full backpressure), writer thread (queue 1024 as app.rs), bindings for
/// `devices`, and the uplink connected (waits for its CONNACK).
async fn start_gateway(
    broker: &TestBroker,
    version: MqttVersion,
    devices: &[String],
    client_id: &str,
    capacity: usize,
) -> Result<Gateway, String> {
    let dir = tempfile::Builder::new()
        .prefix("phg-bench-journal-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| format!("journal temp dir: {e}"))?;
    // The journal wants its directory private (it would tighten it itself, with a warning).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| format!("journal temp dir: {e}"))?;
    let mut jcfg = JournalConfig::new(dir.path());
    let cap = u64::try_from(capacity).unwrap_or(u64::MAX);
    jcfg.max_records = jcfg.max_records.max(cap + 1024).min(MAX_RECORDS_LIMIT);
    jcfg.max_bytes = jcfg.max_bytes.max(cap.saturating_mul(4096));
    let (journal, _recovery) = Journal::open(jcfg).map_err(|e| format!("journal: {e}"))?;
    let journal = Arc::new(Mutex::new(journal));
    let appended = Arc::new(Handoff::default());
    let (writer, writer_thread) = writer::spawn(journal.clone(), appended.clone(), 1024)
        .map_err(|e| format!("writer: {e}"))?;
    let mut bindings = Bindings::default();
    for (i, d) in devices.iter().enumerate() {
        bindings.bind(d, None, &format!("pt-bench-{i}"));
    }
    let topics = Topics::for_gateway(GATEWAY_ID);
    let counters = Arc::new(Counters::default());
    let pipeline = Pipeline {
        gateway_id: GATEWAY_ID.to_owned(),
        topics: topics.clone(),
        bindings: Arc::new(bindings),
        journal: journal.clone(),
        writer,
        counters: counters.clone(),
        // Edge alerts off: the issue's path is decode → validate → journal → publish → PUBACK → ack.
        alerts: None,
    };
    // As app::uplink_config with a default config: MQTT 5 (3.1.1 for rumqttd), window 100.
    let mut u = UplinkConfig::new(broker.url(), client_id, topics.status());
    u.mqtt_version = version;
    u.inflight = WINDOW;
    u.online_payload = serde_json::to_vec(&StatusMessage::online(GATEWAY_ID, Some("bench")))
        .map_err(|e| e.to_string())?;
    u.offline_payload =
        serde_json::to_vec(&StatusMessage::offline(GATEWAY_ID)).map_err(|e| e.to_string())?;
    let checked = u.validate().map_err(|e| format!("uplink config: {e}"))?;
    let stop = CancellationToken::new();
    let before = capture::CONNECTS.load(Ordering::SeqCst);
    let uplink = tokio::spawn(uplink::run_checked(
        checked,
        journal.clone(),
        appended,
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while capture::CONNECTS.load(Ordering::SeqCst) == before {
        if Instant::now() > deadline || uplink.is_finished() {
            return Err(format!(
                "uplink did not connect to {} within 10 s",
                broker.url()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Gateway {
        pipeline,
        journal,
        counters,
        writer_thread,
        uplink,
        stop,
        dir,
        devices: devices.to_vec(),
    })
}

impl Gateway {
    /// Ordered stop as app.rs: writer first (drop the pipeline), then the uplink.
    async fn stop(self) -> (Result<UplinkStats, String>, tempfile::TempDir) {
        drop(self.pipeline);
        let t = self.writer_thread;
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
        self.stop.cancel();
        let stats = match self.uplink.await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("uplink task: {e}")),
        };
        (stats, self.dir)
    }
}

// ---------------------------------------------------------------------------------------------------------
// (b) Throughput through the gateway
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Fed {
    values: usize,
    errors: usize,
    first_error: Option<String>,
}

#[derive(Debug, Default)]
struct Drain {
    /// All sessions' `end_of_transfer` returned (everything accepted).
    all_accepted: Option<Duration>,
    /// …and the journal empty (everything PUBACKed and acked).
    drained: Option<Duration>,
    /// Journal depth when everything was accepted: what the uplink still had to send then.
    depth_at_all_accepted: u64,
    peak_depth: u64,
    peak_pending_bytes: u64,
    /// One record's topic and payload length, looked at once.
    sample: Option<(usize, usize)>,
    /// How long this 1 ms probe waited for the journal lock (ms): while the sessions were still
    /// feeding, and afterwards (the uplink's reads and acks wait the same way).
    lock_wait_ingest: Vec<f64>,
    lock_wait_drain: Vec<f64>,
}

/// Polls the journal every millisecond on a blocking thread (never on a runtime worker: the lock may be
/// held across an fdatasync).
fn watch_drain(
    journal: Arc<Mutex<Journal>>,
    feeders_done: Arc<AtomicUsize>,
    feeders: usize,
    t0: Instant,
    timeout: Duration,
) -> Drain {
    let mut d = Drain::default();
    loop {
        std::thread::sleep(Duration::from_millis(1));
        let all_fed = feeders_done.load(Ordering::SeqCst) == feeders;
        let asked = Instant::now();
        let (depth, bytes) = {
            let j = lock(&journal);
            let waited = ms(asked.elapsed());
            if all_fed {
                &mut d.lock_wait_drain
            } else {
                &mut d.lock_wait_ingest
            }
            .push(waited);
            if d.sample.is_none() {
                // A failed read leaves the sample for the next round.
                d.sample = j
                    .pending(None, 1)
                    .ok()
                    .and_then(|p| p.first().map(|r| (r.topic.len(), r.payload.len())));
            }
            (j.depth(), j.pending_bytes())
        };
        d.peak_depth = d.peak_depth.max(depth);
        d.peak_pending_bytes = d.peak_pending_bytes.max(bytes);
        if all_fed && d.all_accepted.is_none() {
            d.all_accepted = Some(t0.elapsed());
            d.depth_at_all_accepted = depth;
        }
        if all_fed && depth == 0 {
            d.drained = Some(t0.elapsed());
            return d;
        }
        if t0.elapsed() > timeout {
            return d;
        }
    }
}

async fn feed_session(
    pipeline: Pipeline,
    device: String,
    values: Vec<Value>,
    start: Arc<Barrier>,
    done: Arc<AtomicUsize>,
) -> Fed {
    let session = session_info(&device);
    let mut sink = pipeline.session();
    let mut fed = Fed::default();
    start.wait().await;
    for v in &values {
        match sink
            .value(&session, GLUCOSE_MEASUREMENT, v.as_slice(), unix_now())
            .await
        {
            Ok(()) => fed.values += 1,
            Err(e) => {
                fed.errors += 1;
                fed.first_error.get_or_insert_with(|| e.to_string());
                break; // as the collector: a refused value ends the session
            }
        }
    }
    if let Err(e) = sink.end_of_transfer(&session).await {
        fed.errors += 1;
        fed.first_error.get_or_insert_with(|| e.to_string());
    }
    done.fetch_add(1, Ordering::SeqCst);
    fed
}

#[derive(Debug)]
struct Throughput {
    readings: usize,
    devices: usize,
    elapsed: Option<Duration>,
    all_accepted: Option<Duration>,
    accepted: u64,
    rejected: u64,
    unattributed: u64,
    refused: u64,
    feed_errors: Vec<String>,
    uplink: Result<UplinkStats, String>,
    depth_at_all_accepted: u64,
    lock_wait_ingest: Dist,
    lock_wait_drain: Dist,
    peak_depth: u64,
    peak_pending_bytes: u64,
    sample: Option<(usize, usize)>,
    journal_bytes: u64,
    journal_dir: PathBuf,
    disk: Option<(String, u64)>,
    rss_before_kb: Option<u64>,
    hwm_during_kb: Option<u64>,
    hwm_reset: bool,
    rss_after_kb: Option<u64>,
    inputs_bytes: usize,
}

impl Throughput {
    fn rate(&self) -> Option<f64> {
        self.elapsed.map(|e| self.readings as f64 / e.as_secs_f64())
    }
}

async fn gateway_throughput(
    broker: &TestBroker,
    version: MqttVersion,
    sizes: &Sizes,
) -> Result<Throughput, String> {
    let now = unix_now();
    let devices: Vec<String> = (0..sizes.devices)
        .map(|d| format!("C0:26:DA:00:B0:{d:02X}"))
        .collect();
    // Inputs first, outside every measurement.
    let inputs: Vec<Vec<Value>> = (0..sizes.devices)
        .map(|d| glucose_values(d, sizes.per_device, now))
        .collect();
    let inputs_bytes = sizes.readings() * std::mem::size_of::<Value>();
    let gw = start_gateway(
        broker,
        version,
        &devices,
        "phg-gw-bench-throughput",
        sizes.readings(),
    )
    .await?;
    let journal_dir = gw.dir.path().to_path_buf();
    let disk_dev = block_device_of(&journal_dir);

    sync_all();
    let sectors0 = disk_dev.as_ref().and_then(|(_, s)| sectors_written(s));
    let bytes0 = lock(&gw.journal).bytes_written();
    let hwm_reset = reset_peak_rss();
    let rss_before_kb = proc_status_kb("VmRSS");

    let start = Arc::new(Barrier::new(sizes.devices + 1));
    let done = Arc::new(AtomicUsize::new(0));
    let mut feeders = Vec::new();
    for (device, values) in gw.devices.iter().cloned().zip(inputs) {
        feeders.push(tokio::spawn(feed_session(
            gw.pipeline.clone(),
            device,
            values,
            start.clone(),
            done.clone(),
        )));
    }
    // Profiling aid: PHG_BENCH_TRACE_B=FILE writes the uplink's per-record events of (b) to FILE.
    let trace_b = std::env::var_os("PHG_BENCH_TRACE_B");
    if trace_b.is_some() {
        capture::start();
    }
    let t0 = Instant::now();
    start.wait().await;
    let timeout = Duration::from_secs(if sizes.quick { 120 } else { 900 });
    let (j, dn, n) = (gw.journal.clone(), done.clone(), sizes.devices);
    let drain = tokio::task::spawn_blocking(move || watch_drain(j, dn, n, t0, timeout))
        .await
        .map_err(|e| format!("watcher: {e}"))?;
    let hwm_during_kb = proc_status_kb("VmHWM");
    if let Some(path) = trace_b {
        let mut out = String::new();
        for (what, seq, t) in capture::stop() {
            let _ = writeln!(out, "{:.6} {what:?} {seq}", signed_ms(t, t0));
        }
        if let Err(e) = std::fs::write(&path, out) {
            eprintln!("bench: cannot write {}: {e}", Path::new(&path).display());
        }
    }
    let rss_after_kb = proc_status_kb("VmRSS");
    let journal_bytes = lock(&gw.journal).bytes_written().saturating_sub(bytes0);
    sync_all();
    let disk = match (&disk_dev, sectors0) {
        (Some((name, stat)), Some(s0)) => {
            sectors_written(stat).map(|s1| (name.clone(), s1.saturating_sub(s0) * 512))
        }
        _ => None,
    };

    let mut feed_errors = Vec::new();
    for f in feeders {
        match f.await {
            Ok(fed) if fed.errors > 0 => feed_errors.push(format!(
                "{} values fed, {} errors, first: {}",
                fed.values,
                fed.errors,
                fed.first_error.unwrap_or_default()
            )),
            Ok(_) => {}
            Err(e) => feed_errors.push(format!("feeder task: {e}")),
        }
    }
    let c = &gw.counters;
    let (accepted, rejected, unattributed, refused) = (
        c.accepted.load(Ordering::Relaxed),
        c.rejected.load(Ordering::Relaxed),
        c.unattributed.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
    );
    let (uplink, _dir) = gw.stop().await;
    Ok(Throughput {
        readings: sizes.readings(),
        devices: sizes.devices,
        elapsed: drain.drained,
        all_accepted: drain.all_accepted,
        accepted,
        rejected,
        unattributed,
        refused,
        feed_errors,
        uplink,
        depth_at_all_accepted: drain.depth_at_all_accepted,
        lock_wait_ingest: Dist::of(drain.lock_wait_ingest),
        lock_wait_drain: Dist::of(drain.lock_wait_drain),
        peak_depth: drain.peak_depth,
        peak_pending_bytes: drain.peak_pending_bytes,
        sample: drain.sample,
        journal_bytes,
        journal_dir,
        disk,
        rss_before_kb,
        hwm_during_kb,
        hwm_reset,
        rss_after_kb,
        inputs_bytes,
    })
}

// ---------------------------------------------------------------------------------------------------------
// (c) Latency at a steady rate
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Latency {
    readings: usize,
    rate_hz: u32,
    /// received (value() called) → accepted (end_of_transfer returned: fsynced).
    received_to_accepted: Dist,
    /// accepted → the uplink handled the broker's PUBACK (its "record PUBACKed" event).
    accepted_to_puback: Dist,
    /// accepted → rumqttc wrote the publish (the uplink's "record published" event).
    accepted_to_published: Dist,
    /// publish written → PUBACK handled.
    published_to_puback: Dist,
    /// accepted → the record left the journal's pending set (PUBACK + ack linger + ack fdatasync),
    /// polled every 1 ms (an upper bound by ≤ ~1 ms).
    accepted_to_journal_ack: Dist,
    /// A reading's payload length (from the journal).
    payload: Option<usize>,
    /// PUBACKs handled > 2 ms after their publish and within 0.5 ms after the *next* publish: held
    /// back by the broker until the gateway's next segment (Nagle on the broker × delayed ACK here).
    held_until_next_publish: usize,
    missing_puback: usize,
    seq_mismatches: usize,
    seq_unverified: usize,
    uplink: Result<UplinkStats, String>,
}

async fn gateway_latency(
    broker: &TestBroker,
    version: MqttVersion,
    sizes: &Sizes,
) -> Result<Latency, String> {
    let n = sizes.latency_readings;
    let ndev = sizes.devices;
    let devices: Vec<String> = (0..ndev)
        .map(|d| format!("C0:26:DA:00:C0:{d:02X}"))
        .collect();
    let now = unix_now();
    let per = n.div_ceil(ndev);
    let per_device: Vec<Vec<Value>> = (0..ndev)
        .map(|d| glucose_values(d + 16, per, now))
        .collect();
    // Reading i: device i % ndev, its record i / ndev; with the reading id the journal must hold.
    let mut plan = Vec::with_capacity(n);
    for i in 0..n {
        let d = i % ndev;
        let Some(v) = per_device.get(d).and_then(|vs| vs.get(i / ndev)).copied() else {
            return Err("latency plan out of range".into());
        };
        let g = GlucoseMeasurement::parse(v.as_slice()).map_err(|e| format!("own input: {e}"))?;
        let id = protocol::wire::reading_id_of(
            &devices[d],
            &Measurement::Glucose(GlucoseRecord::from_gatt(&g)),
        )
        .to_string();
        plan.push((d, v, id));
    }
    let gw = start_gateway(broker, version, &devices, "phg-gw-bench-latency", n).await?;
    let sessions: Vec<SessionInfo> = devices.iter().map(|d| session_info(d)).collect();
    let mut sinks: Vec<_> = (0..ndev).map(|_| gw.pipeline.session()).collect();

    // accepted[seq - 1] = when end_of_transfer returned for journal seq `seq` (a fresh journal: seqs
    // 1, 2, … in feeding order, checked against the reading id below).
    let accepted: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let poll_stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (journal, accepted, stop) = (gw.journal.clone(), accepted.clone(), poll_stop.clone());
        tokio::task::spawn_blocking(move || journal_ack_times(&journal, &accepted, &stop, n))
    };
    capture::start();
    let mut received = Vec::with_capacity(n);
    let (mut mismatches, mut unverified) = (0usize, 0usize);
    let mut payload = None;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / sizes.rate_hz);
    for (i, (d, v, id)) in plan.iter().enumerate() {
        ticker.tick().await;
        let (Some(sink), Some(session)) = (sinks.get_mut(*d), sessions.get(*d)) else {
            continue;
        };
        let t_rx = Instant::now();
        let r = sink
            .value(session, GLUCOSE_MEASUREMENT, v.as_slice(), unix_now())
            .await;
        let r = match r {
            Ok(()) => sink.end_of_transfer(session).await,
            Err(e) => Err(e),
        };
        let t_acc = Instant::now();
        if let Err(e) = r {
            poll_stop.store(true, Ordering::SeqCst);
            capture::stop();
            return Err(format!("reading {i} not accepted: {e}"));
        }
        received.push(t_rx);
        lock(&accepted).push(t_acc);
        let seq = i as u64 + 1;
        match lock(&gw.journal)
            .pending(Some(seq - 1), 1)
            .map_err(|e| format!("journal: {e}"))?
            .first()
        {
            Some(r) if r.seq == seq && &r.reading_id == id => {
                payload.get_or_insert(r.payload.len());
            }
            Some(r) if r.seq == seq || r.reading_id == *id => mismatches += 1,
            _ => unverified += 1, // already acked (not expected within µs) or a gap
        }
    }
    // Everything out of the journal (or 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock(&gw.journal).depth() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    poll_stop.store(true, Ordering::SeqCst);
    let acked_at = poller.await.map_err(|e| format!("poller: {e}"))?;
    let events = capture::stop();
    // The sessions hold writer handles: the writer thread ends only when all of them are gone.
    drop(sinks);
    let (uplink, _dir) = gw.stop().await;

    let accepted = std::mem::take(&mut *lock(&accepted));
    let mut published: Vec<Option<Instant>> = vec![None; n];
    let mut pubacked: Vec<Option<Instant>> = vec![None; n];
    for (what, seq, t) in events {
        let Some(slot) = usize::try_from(seq).ok().and_then(|s| s.checked_sub(1)) else {
            continue;
        };
        let v = match what {
            capture::What::Published => &mut published,
            capture::What::PubAcked => &mut pubacked,
        };
        if let Some(x) = v.get_mut(slot) {
            x.get_or_insert(t);
        }
    }
    // Profiling aid: PHG_BENCH_TRACE_C=FILE writes, per reading: accepted, published, PUBACKed (ms).
    if let Some(path) = std::env::var_os("PHG_BENCH_TRACE_C") {
        let t0 = accepted.first().copied().unwrap_or_else(Instant::now);
        let rel = |t: Option<Instant>| t.map_or(f64::NAN, |t| signed_ms(t, t0));
        let mut out = String::new();
        for (i, &t_acc) in accepted.iter().enumerate() {
            let _ = writeln!(
                out,
                "{i} {:.3} {:.3} {:.3}",
                rel(Some(t_acc)),
                rel(published.get(i).copied().flatten()),
                rel(pubacked.get(i).copied().flatten())
            );
        }
        if let Err(e) = std::fs::write(&path, out) {
            eprintln!("bench: cannot write {}: {e}", Path::new(&path).display());
        }
    }
    let held = (0..accepted.len())
        .filter(|&i| {
            let p = published.get(i).copied().flatten();
            let a = pubacked.get(i).copied().flatten();
            let next = published.get(i + 1).copied().flatten();
            match (p, a, next) {
                (Some(p), Some(a), Some(n)) => signed_ms(a, p) > 2.0 && signed_ms(a, n).abs() < 0.5,
                _ => false,
            }
        })
        .count();
    let mut rx_acc = Vec::new();
    let (mut acc_pa, mut acc_pub, mut pub_pa, mut acc_jack) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut missing = 0;
    for (i, &t_acc) in accepted.iter().enumerate() {
        if let Some(&t_rx) = received.get(i) {
            rx_acc.push(signed_ms(t_acc, t_rx));
        }
        match (
            published.get(i).copied().flatten(),
            pubacked.get(i).copied().flatten(),
        ) {
            (Some(tp), Some(ta)) => {
                acc_pa.push(signed_ms(ta, t_acc));
                acc_pub.push(signed_ms(tp, t_acc));
                pub_pa.push(signed_ms(ta, tp));
            }
            (_, Some(ta)) => acc_pa.push(signed_ms(ta, t_acc)),
            _ => missing += 1,
        }
        if let Some(Some(tj)) = acked_at.get(i) {
            acc_jack.push(signed_ms(*tj, t_acc));
        }
    }
    Ok(Latency {
        readings: accepted.len(),
        rate_hz: sizes.rate_hz,
        received_to_accepted: Dist::of(rx_acc),
        accepted_to_puback: Dist::of(acc_pa),
        accepted_to_published: Dist::of(acc_pub),
        published_to_puback: Dist::of(pub_pa),
        accepted_to_journal_ack: Dist::of(acc_jack),
        payload,
        held_until_next_publish: held,
        missing_puback: missing,
        seq_mismatches: mismatches,
        seq_unverified: unverified,
        uplink,
    })
}

/// Every 1 ms: which accepted seqs have left the journal's pending set. Seqs registered in `accepted`
/// *before* the journal is looked at were appended before it too, so each of them below the oldest
/// pending seq (or all, if none is pending) has been acked. An out-of-order ack is seen late (upper
/// bound).
fn journal_ack_times(
    journal: &Mutex<Journal>,
    accepted: &Mutex<Vec<Instant>>,
    stop: &AtomicBool,
    n: usize,
) -> Vec<Option<Instant>> {
    let mut acked: Vec<Option<Instant>> = vec![None; n];
    let mut resolved = 0usize; // seqs 1..=resolved have an ack time
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let known = lock(accepted).len();
        let oldest = match lock(journal).pending(None, 1) {
            Ok(p) => p.first().map(|r| r.seq),
            Err(e) => {
                // Without the oldest pending seq no ack time can be told: stop with what we have.
                eprintln!("journal: {e}");
                return acked;
            }
        };
        let now = Instant::now();
        while resolved < known {
            let seq = resolved as u64 + 1;
            if oldest.is_some_and(|o| seq >= o) {
                break;
            }
            if let Some(slot) = acked.get_mut(resolved) {
                *slot = Some(now);
            }
            resolved += 1;
        }
        if stopping || resolved >= n {
            return acked;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------------------

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

/// CPU time (user + system) of this process and of the broker's, read from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy)]
struct CpuTime {
    this: u64,
    broker: u64,
}

impl CpuTime {
    /// Linux's USER_HZ: `/proc` counts CPU time in 1/100 s on every architecture (a fixed ABI value).
    const TICKS_PER_S: f64 = 100.0;

    fn ticks(pid: &str) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces, so split after its closing paren):
        // state is field 3, utime 14 and stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }

    fn now(broker: Option<u32>) -> Option<CpuTime> {
        Some(CpuTime {
            this: Self::ticks("self")?,
            broker: Self::ticks(&broker?.to_string())?,
        })
    }

    /// µs of CPU per message since `self`: (this process, the broker).
    fn per_message(self, broker: Option<u32>, messages: usize) -> Option<(f64, f64)> {
        let now = CpuTime::now(broker)?;
        let us = |ticks: u64| ticks as f64 / Self::TICKS_PER_S * 1e6 / messages.max(1) as f64;
        Some((
            us(now.this.saturating_sub(self.this)),
            us(now.broker.saturating_sub(self.broker)),
        ))
    }
}

fn mosquitto_version() -> Option<String> {
    let out = Command::new(mosquitto_path()?).arg("-h").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().next().map(|l| l.trim().to_owned())
}

fn kb_mb(kb: Option<u64>) -> String {
    kb.map_or_else(|| "n/a".into(), |k| format!("{:.1} MB", k as f64 / 1024.0))
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn percent(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{:.0} %", x * 100.0))
}

async fn run(sizes: Sizes) -> Result<(), String> {
    println!("# phg gateway pipeline benchmark");
    println!();
    println!(
        "mode: {}  (raw: {} messages; gateway: {} readings = {} devices × {}; latency: {} readings at {}/s)",
        if sizes.quick {
            "QUICK (smoke run, not the reference sizes)"
        } else {
            "full"
        },
        thousands(sizes.raw_messages as f64),
        thousands(sizes.readings() as f64),
        sizes.devices,
        thousands(sizes.per_device as f64),
        thousands(sizes.latency_readings as f64),
        sizes.rate_hz
    );
    println!(
        "machine: {}; load average at start: {}",
        machine(),
        loadavg()
    );

    // One broker for everything.
    let mut broker_extra = String::new();
    let broker = if sizes.broker_defaults {
        TestBroker::start().map_err(|e| format!("broker: {e}"))?
    } else {
        // Profiling aid: PHG_BENCH_BROKER_EXTRA adds Mosquitto config lines (`\n`-separated).
        broker_extra = match std::env::var("PHG_BENCH_BROKER_EXTRA") {
            Ok(more) if !more.is_empty() => {
                format!("{BROKER_EXTRA}\n{}", more.replace("\\n", "\n"))
            }
            _ => BROKER_EXTRA.to_owned(),
        };
        match TestBroker::start_mosquitto_with(&broker_extra) {
            Some(b) => b.map_err(|e| format!("mosquitto: {e}"))?,
            None => {
                println!(
                    "!! Mosquitto is not installed: using the EMBEDDED rumqttd (MQTT 3.1.1 only)"
                );
                TestBroker::start_embedded().map_err(|e| format!("embedded broker: {e}"))?
            }
        }
    };
    let broker_label = match broker.kind() {
        BrokerKind::Mosquitto => format!(
            "{} on {} (TestBroker config{})",
            mosquitto_version().unwrap_or_else(|| "mosquitto".into()),
            broker.addr(),
            if broker_extra.is_empty() {
                String::new()
            } else {
                format!(" + `{}`", broker_extra.replace('\n', "`, `"))
            }
        ),
        BrokerKind::Rumqttd => format!("EMBEDDED rumqttd on {} (Mosquitto absent)", broker.addr()),
    };
    println!("broker: {broker_label}");
    let tmp = std::env::temp_dir();
    let tmp_disk = block_device_of(&tmp).map_or_else(|| "no block device".into(), |(n, _)| n);
    let work_disk =
        block_device_of(Path::new("/work")).map_or_else(|| "no block device".into(), |(n, _)| n);
    println!(
        "journal: a fresh dir per run under {} (std::env::temp_dir) on {tmp_disk}; /work is on {work_disk}",
        tmp.display()
    );
    let v5_ok = broker.kind() == BrokerKind::Mosquitto;
    let gw_version = if v5_ok {
        MqttVersion::V5
    } else {
        MqttVersion::V311
    };
    let ver = if v5_ok { "MQTT 5" } else { "MQTT 3.1.1" };
    println!(
        "gateway uplink: {ver}, window {WINDOW}, QoS 1 (journal bounds raised to fit every reading)"
    );
    println!(
        "order of the runs: (a), (c), (b) + (d) + (e), (a'): (c) first so that its RSS is not (b)'s heap"
    );
    println!();

    // (a)
    println!("## (a) ceiling: raw rumqttc QoS 1, window {WINDOW}, all PUBACKs awaited");
    let mut raws = Vec::new();
    let mut raw_cpu = None;
    if v5_ok {
        let before = CpuTime::now(broker.pid());
        raws.push(
            raw_throughput(
                &broker,
                MqttVersion::V5,
                sizes.raw_messages,
                RAW_PAYLOAD,
                "MQTT 5",
            )
            .await?,
        );
        raw_cpu = before.and_then(|b| b.per_message(broker.pid(), sizes.raw_messages));
    }
    raws.push(
        raw_throughput(
            &broker,
            MqttVersion::V311,
            sizes.raw_messages,
            RAW_PAYLOAD,
            "MQTT 3.1.1",
        )
        .await?,
    );
    for r in &raws {
        println!(
            "{:<11} {} × {} B in {:.2} s → {} msg/s{}",
            r.label,
            thousands(r.messages as f64),
            r.payload,
            r.elapsed.as_secs_f64(),
            thousands(r.rate()),
            match (r.label.as_str(), r.receive_max) {
                ("MQTT 5", Some(m)) => format!("  (broker receive-maximum {m})"),
                ("MQTT 5", None) => "  (broker sent no receive-maximum: 65 535)".into(),
                _ => String::new(),
            }
        );
    }
    let ceiling = raws.first().cloned().ok_or("no raw run")?;
    println!();

    // (c)
    println!(
        "## (c) latency at {} readings/s ({} readings, one at a time, round-robin over {} devices)",
        sizes.rate_hz,
        thousands(sizes.latency_readings as f64),
        sizes.devices
    );
    let c_hwm_reset = reset_peak_rss();
    let lat = gateway_latency(&broker, gw_version, &sizes).await?;
    let c_hwm_kb = proc_status_kb("VmHWM");
    println!(
        "{} readings accepted; accepted = SessionSink::end_of_transfer returned (the record is fsynced)",
        thousands(lat.readings as f64)
    );
    println!(
        "received → accepted:                        {}",
        lat.received_to_accepted.line()
    );
    println!(
        "accepted → uplink handled its PUBACK [1]:    {}",
        lat.accepted_to_puback.line()
    );
    println!(
        "  accepted → publish written by rumqttc [2]: {}",
        lat.accepted_to_published.line()
    );
    println!(
        "  publish written → PUBACK handled:          {}",
        lat.published_to_puback.line()
    );
    println!(
        "accepted → left the journal (acked) [3]:     {}",
        lat.accepted_to_journal_ack.line()
    );
    println!(
        "[1] the uplink's own `record PUBACKed` debug event for that journal seq, captured by a tracing layer;"
    );
    println!("    negative = the PUBACK came before the session task saw end_of_transfer return");
    println!("[2] its `record published` event (rumqttc's Outgoing::Publish)");
    println!(
        "[3] oldest pending seq polled every 1 ms: PUBACK + ack linger (10 ms) + ack fdatasync; upper bound"
    );
    println!(
        "PUBACKs held by the broker until the gateway's next publish (> 2 ms after their own publish, \
         < 0.5 ms after the next one: broker Nagle × delayed ACK): {} of {}",
        lat.held_until_next_publish, lat.readings
    );
    if lat.missing_puback > 0 || lat.seq_mismatches > 0 || lat.seq_unverified > 0 {
        println!(
            "!! {} readings without a captured PUBACK, {} seq/reading-id mismatches, {} unverified",
            lat.missing_puback, lat.seq_mismatches, lat.seq_unverified
        );
    }
    if let Err(e) = &lat.uplink {
        println!("!! uplink: {e}");
    }
    let wire_payload_c = lat.payload.unwrap_or(RAW_PAYLOAD);
    let rtt = raw_round_trips(
        &broker,
        gw_version,
        sizes.latency_readings,
        wire_payload_c,
        sizes.rate_hz,
    )
    .await?;
    let rtt = Dist::of(rtt);
    println!(
        "raw rumqttc publish → PUBACK, one at a time at {}/s, {} B, {ver}: {}",
        sizes.rate_hz,
        wire_payload_c,
        rtt.line()
    );
    let lat_ratio = lat.accepted_to_puback.p99 / rtt.p99;
    println!("p99 ratio gateway [1] / raw = {lat_ratio:.1}×");
    // The headline figures as `RATIO name value` / `RSS_PEAK_MB name value` lines, comparable across runs
    // (issue 15 item 6; the ingest bench prints its own).
    println!("RATIO gateway_p99_accept_to_puback_vs_raw_rtt {lat_ratio:.2}");
    if let Some(kb) = c_hwm_kb.filter(|_| c_hwm_reset) {
        println!(
            "RSS_PEAK_MB gateway_steady_{}_per_s {:.1}",
            sizes.rate_hz,
            kb as f64 / 1024.0
        );
    }
    println!(
        "peak RSS during (c) (gateway at {}/s, from a {} reset): {}",
        sizes.rate_hz,
        if c_hwm_reset { "VmHWM" } else { "FAILED" },
        kb_mb(c_hwm_kb)
    );
    println!();

    // (b)
    println!(
        "## (b) gateway path: {} readings, {} devices × {} in concurrent sessions → journal → uplink",
        thousands(sizes.readings() as f64),
        sizes.devices,
        thousands(sizes.per_device as f64)
    );
    let before = CpuTime::now(broker.pid());
    let tp = gateway_throughput(&broker, gw_version, &sizes).await?;
    let path_cpu = before.and_then(|b| b.per_message(broker.pid(), tp.readings));
    let tp_rate = tp.rate();
    match (tp.elapsed, tp_rate) {
        (Some(e), Some(rate)) => println!(
            "first value → journal empty: {:.2} s → {} readings/s",
            e.as_secs_f64(),
            thousands(rate)
        ),
        _ => println!("!! the journal did not drain within the time limit"),
    }
    if let (Some(a), Some(e)) = (tp.all_accepted, tp.elapsed) {
        let sent_meanwhile = tp.readings as f64 - tp.depth_at_all_accepted as f64;
        println!(
            "  phase 1, first value → all accepted (fsynced): {:.2} s → ingest {} readings/s; uplink acked {} \
             meanwhile → {} readings/s",
            a.as_secs_f64(),
            thousands(tp.readings as f64 / a.as_secs_f64()),
            thousands(sent_meanwhile),
            thousands(sent_meanwhile / a.as_secs_f64())
        );
        let rest = e.saturating_sub(a).as_secs_f64();
        println!(
            "  phase 2, uplink alone: {} readings in {:.2} s → {} readings/s",
            thousands(tp.depth_at_all_accepted as f64),
            rest,
            thousands(tp.depth_at_all_accepted as f64 / rest)
        );
    }
    println!(
        "  journal lock wait of a 1 ms probe — phase 1: {}",
        tp.lock_wait_ingest.line()
    );
    println!(
        "  journal lock wait of a 1 ms probe — phase 2: {}",
        tp.lock_wait_drain.line()
    );
    println!(
        "accepted {} / rejected {} / unattributed {} / refused {}",
        tp.accepted, tp.rejected, tp.unattributed, tp.refused
    );
    for e in &tp.feed_errors {
        println!("!! session error: {e}");
    }
    match &tp.uplink {
        Ok(s) => println!(
            "uplink: published {}, delivered {}, connections {}, losses {}, refused {}, unacked at exit {}",
            s.published,
            s.delivered,
            s.connections,
            s.connection_losses,
            s.refused,
            s.unacked_at_exit
        ),
        Err(e) => println!("!! uplink: {e}"),
    }
    println!(
        "journal peak: {} pending records, {:.1} MB pending on disk (memory holds an index of ~81 B per record)",
        thousands(tp.peak_depth as f64),
        tp.peak_pending_bytes as f64 / 1e6
    );
    if let Some((t, p)) = tp.sample {
        println!("a reading on the wire: topic {t} B, payload {p} B (JSON)");
    }
    let ratio = tp_rate.map(|r| r / ceiling.rate());
    println!(
        "(b)/(a, {}, {} B) = {}",
        ceiling.label,
        ceiling.payload,
        percent(ratio)
    );
    if let Some(r) = ratio {
        println!("RATIO gateway_durable_path_vs_raw_qos1 {r:.2}");
    }
    // Both runs keep most of the two cores busy (client or gateway, and the broker), so the CPU time a
    // message costs bounds the ratio: with the same cores, (b) cannot reach more of (a) than (a)'s CPU
    // per message over (b)'s.
    if let (Some((ra, rb)), Some((pa, pb))) = (raw_cpu, path_cpu) {
        let busy = |us: f64, rate: f64| us * rate / 1e6;
        println!(
            "CPU per message: (a) {ra:.1} µs this process + {rb:.1} µs broker = {:.1} µs ({:.2} cores busy); \
             (b) {pa:.1} µs + {pb:.1} µs = {:.1} µs ({:.2} cores busy) → with the same cores, (b) can reach at \
             most {} of (a)",
            ra + rb,
            busy(ra + rb, ceiling.rate()),
            pa + pb,
            busy(pa + pb, tp_rate.unwrap_or(0.0)),
            percent(Some((ra + rb) / (pa + pb)))
        );
        println!(
            "RATIO gateway_cpu_per_reading_raw_over_path {:.2}",
            (ra + rb) / (pa + pb)
        );
    }
    println!();

    // (d), (e)
    println!("## (d) memory (VmRSS / VmHWM of this process)");
    println!(
        "before (b): RSS {} (after (a) and (c); includes the pre-generated inputs, {:.1} MB)",
        kb_mb(tp.rss_before_kb),
        tp.inputs_bytes as f64 / 1e6
    );
    println!(
        "peak during (b): VmHWM {}{}",
        kb_mb(tp.hwm_during_kb),
        if tp.hwm_reset {
            " (reset just before (b))"
        } else {
            " (could not reset: process-lifetime peak)"
        }
    );
    if let Some(kb) = tp.hwm_during_kb.filter(|_| tp.hwm_reset) {
        println!(
            "RSS_PEAK_MB gateway_durable_path_{}_devices {:.1}",
            tp.devices,
            kb as f64 / 1024.0
        );
    }
    println!("after (b), before teardown: RSS {}", kb_mb(tp.rss_after_kb));
    println!(
        "(all of it: this process also runs the benchmark's own tokio runtime, tracing capture and inputs; \
         no MQTT subscriber anywhere)"
    );
    println!();
    println!("## (e) bytes written per reading in (b)");
    let jb = tp.journal_bytes as f64 / tp.readings as f64;
    println!(
        "journal.bytes_written(): {} B total → {:.0} B/reading (appends + acks + checkpoints)",
        thousands(tp.journal_bytes as f64),
        jb
    );
    let disk_per = tp
        .disk
        .as_ref()
        .map(|(_, b)| *b as f64 / tp.readings as f64);
    match &tp.disk {
        Some((name, b)) => println!(
            "block device {name} (/sys/block stat field 7 × 512, `sync` before and after; whole device: \
             other processes' writes in the window count too): {} B → {:.0} B/reading",
            thousands(*b as f64),
            disk_per.unwrap_or(f64::NAN)
        ),
        None => println!("block device: n/a for {}", tp.journal_dir.display()),
    }
    println!();

    // (a') The ceiling with the gateway's payload size (200 B understates a reading's bytes).
    let wire_payload = tp.sample.map_or(wire_payload_c, |(_, p)| p);
    let same_size =
        raw_throughput(&broker, gw_version, sizes.raw_messages, wire_payload, ver).await?;
    println!(
        "## (a') raw {} with the gateway's payload size ({} B): {} msg/s → (b)/(a') = {}",
        same_size.label,
        wire_payload,
        thousands(same_size.rate()),
        percent(tp_rate.map(|r| r / same_size.rate()))
    );
    // Reference: the same MQTT 5 ceiling against Mosquitto's default receive-maximum.
    let mut default_broker_row = None;
    if v5_ok
        && !sizes.broker_defaults
        && let Some(Ok(b2)) = TestBroker::start_mosquitto()
        && let Ok(r) = raw_throughput(
            &b2,
            MqttVersion::V5,
            sizes.raw_messages,
            RAW_PAYLOAD,
            "MQTT 5",
        )
        .await
    {
        println!(
            "reference: raw MQTT 5 against a second Mosquitto with its defaults (receive-maximum {}): {} msg/s",
            r.receive_max
                .map_or_else(|| "65 535".into(), |m| m.to_string()),
            thousands(r.rate())
        );
        default_broker_row = Some(r);
    }
    println!("load average at end: {}", loadavg());
    println!();

    // The table.
    let mut t = String::new();
    let _ = writeln!(t, "| # | figure | value | target | verdict |");
    let _ = writeln!(t, "|---|---|---|---|---|");
    for r in &raws {
        let _ = writeln!(
            t,
            "| a | raw rumqttc QoS 1, {}, {} × {} B, window {WINDOW}{} | {} msg/s | | |",
            r.label,
            thousands(r.messages as f64),
            r.payload,
            match (r.label.as_str(), r.receive_max) {
                ("MQTT 5", Some(m)) => format!(" (broker receive-max {m})"),
                _ => String::new(),
            },
            thousands(r.rate())
        );
    }
    let _ = writeln!(
        t,
        "| a' | raw rumqttc QoS 1, {}, {} × {} B (gateway payload size), window {WINDOW} | {} msg/s | | |",
        same_size.label,
        thousands(same_size.messages as f64),
        same_size.payload,
        thousands(same_size.rate())
    );
    if let Some(r) = &default_broker_row {
        let _ = writeln!(
            t,
            "| a | (ref.) raw MQTT 5, 200 B, Mosquitto defaults (receive-max {}) | {} msg/s | | |",
            r.receive_max
                .map_or_else(|| "65 535".into(), |m| m.to_string()),
            thousands(r.rate())
        );
    }
    let _ = writeln!(
        t,
        "| b | gateway: {} readings ({} devices), decode → validate → journal (fsync) → {ver} → PUBACK → ack | {} readings/s | | |",
        thousands(tp.readings as f64),
        tp.devices,
        tp_rate.map_or_else(|| "did not finish".into(), thousands)
    );
    let _ = writeln!(
        t,
        "| b | (b) / (a, {}, {} B) | {} | ≥ 70 % | {} |",
        ceiling.label,
        ceiling.payload,
        percent(ratio),
        verdict(ratio.map(|x| x >= 0.70))
    );
    let ratio2 = tp_rate.map(|r| r / same_size.rate());
    let _ = writeln!(
        t,
        "| b | (b) / (a', same payload size) | {} | (≥ 70 %) | {} |",
        percent(ratio2),
        verdict(ratio2.map(|x| x >= 0.70))
    );
    let _ = writeln!(
        t,
        "| c | gateway accepted → PUBACK [1], {}/s, p50 / p99 / max | {:.3} / {:.3} / {:.3} ms | | |",
        lat.rate_hz,
        lat.accepted_to_puback.p50,
        lat.accepted_to_puback.p99,
        lat.accepted_to_puback.max
    );
    let _ = writeln!(
        t,
        "| c | raw publish → PUBACK, {}/s, {} B, p50 / p99 / max | {:.3} / {:.3} / {:.3} ms | | |",
        sizes.rate_hz, wire_payload_c, rtt.p50, rtt.p99, rtt.max
    );
    let _ = writeln!(
        t,
        "| c | p99 gateway [1] / p99 raw | {lat_ratio:.1}× | ≤ 2× | {} |",
        verdict(lat_ratio.is_finite().then_some(lat_ratio <= 2.0))
    );
    let _ = writeln!(
        t,
        "| c | gateway accepted → acked in journal [3], p50 / p99 / max | {:.2} / {:.2} / {:.2} ms | | |",
        lat.accepted_to_journal_ack.p50,
        lat.accepted_to_journal_ack.p99,
        lat.accepted_to_journal_ack.max
    );
    let _ = writeln!(
        t,
        "| c | gateway received → accepted (fsync), p50 / p99 | {:.3} / {:.3} ms | | |",
        lat.received_to_accepted.p50, lat.received_to_accepted.p99
    );
    let _ = writeln!(
        t,
        "| d | peak RSS during (b) (VmHWM reset before (b)) | {} | ≤ 20 MB | {} |",
        kb_mb(tp.hwm_during_kb),
        verdict(tp.hwm_during_kb.map(|k| k <= 20 * 1024))
    );
    let _ = writeln!(
        t,
        "| d | RSS before (b) (incl. {:.1} MB of inputs) / after (b) | {} / {} | | |",
        tp.inputs_bytes as f64 / 1e6,
        kb_mb(tp.rss_before_kb),
        kb_mb(tp.rss_after_kb)
    );
    let _ = writeln!(
        t,
        "| d | (ref.) peak RSS during (c), {}/s | {} | (≤ 20 MB) | {} |",
        sizes.rate_hz,
        kb_mb(c_hwm_kb),
        verdict(c_hwm_kb.map(|k| k <= 20 * 1024))
    );
    let _ = writeln!(
        t,
        "| e | journal bytes written per reading | {jb:.0} B | | |"
    );
    let _ = writeln!(
        t,
        "| e | block device bytes written per reading ({}) | {} | | |",
        tp.disk.as_ref().map_or("n/a", |(n, _)| n.as_str()),
        disk_per.map_or_else(|| "n/a".into(), |b| format!("{b:.0} B"))
    );
    // (f)
    let idle_over = Duration::from_secs(if sizes.quick { 5 } else { 10 });
    println!("## (f) idle: `gateway run`, connected, nothing to do, {idle_over:?}");
    let idle = idle_cpu(&broker, idle_over).await?;
    println!("idle gateway: {:.2} % of one core", idle * 100.0);
    println!();
    let _ = writeln!(
        t,
        "| f | idle `gateway run`, share of one core over {idle_over:?} | {:.2} % | < 1 % | {} |",
        idle * 100.0,
        verdict(Some(idle < 0.01))
    );
    println!("## Summary");
    println!();
    println!(
        "{broker_label}; {}; journal on {tmp_disk} ({})",
        machine(),
        tmp.display()
    );
    println!();
    print!("{t}");
    println!();
    println!(
        "[1] accepted (end_of_transfer returned) → the uplink's `record PUBACKed` event for that journal seq. \
         [3] journal pending set polled every 1 ms (includes the uplink's 10 ms ack linger and the ack fdatasync)."
    );
    Ok(())
}

/// (f): the share of one core an idle `gateway run` uses over `over` (see the module doc).
async fn idle_cpu(broker: &TestBroker, over: Duration) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("idle: temp dir: {e}"))?;
    let version = broker.mqtt_version_setting();
    let cfg = format!(
        "gateway_id = \"gw-bench-idle\"\n[mqtt]\nbroker = \"mqtt://{}\"\nversion = \"{version}\"\n\
         [journal]\ndir = {:?}\n",
        broker.addr(),
        dir.path().join("journal").display().to_string()
    );
    let gw = phg_tests::process::GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg)
        .map_err(|e| format!("idle: start the gateway: {e}"))?;
    if gw
        .stderr()
        .wait_for("uplink connected", 0, Duration::from_secs(30))
        .await
        .is_none()
    {
        return Err(format!(
            "idle: the gateway did not connect:\n{}",
            gw.stderr().text()
        ));
    }
    let before = gw.cpu_time().map_err(|e| format!("idle: {e}"))?;
    tokio::time::sleep(over).await;
    let after = gw.cpu_time().map_err(|e| format!("idle: {e}"))?;
    let _ = gw.terminate(Duration::from_secs(15)).await;
    Ok((after - before).as_secs_f64() / over.as_secs_f64())
}

/// The gateway path runs inside this process, so this process runs with the packaged service's
/// environment (`Environment=` of `packaging/gateway/phg-gateway.service`, as the gateway on a Pi; glibc
/// reads `MALLOC_ARENA_MAX` only at start-up): when it is not set, the bench starts itself again with it
/// and returns that run's status. `PHG_BENCH_NO_SERVICE_ENV=1` runs with the caller's environment.
fn rerun_with_service_environment() -> Option<ExitCode> {
    let opted_out =
        std::env::var("PHG_BENCH_NO_SERVICE_ENV").is_ok_and(|v| !v.is_empty() && v != "0");
    let wanted = service_environment();
    let unset: Vec<&(String, String)> = wanted
        .iter()
        .filter(|(k, v)| std::env::var(k).ok().as_deref() != Some(v.as_str()))
        .collect();
    if opted_out || unset.is_empty() {
        let env: Vec<String> = wanted
            .iter()
            .map(|(k, _)| {
                format!(
                    "{k}={}",
                    std::env::var(k).unwrap_or_else(|_| "(unset)".into())
                )
            })
            .collect();
        println!(
            "environment: {} (the packaged service sets it; PHG_BENCH_NO_SERVICE_ENV=1 leaves the caller's)",
            env.join(" ")
        );
        return None;
    }
    let exe = std::env::current_exe().expect("bench setup: this executable's path");
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(unset.iter().map(|(k, v)| (k, v)))
        .status()
        .expect("bench setup: start the bench again with the service's environment");
    Some(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    if let Some(code) = rerun_with_service_environment() {
        return code;
    }
    let sizes = Sizes::from_args();
    capture::install();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("bench setup: tokio runtime");
    match rt.block_on(run(sizes)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
