//! A thousand gateways against Mosquitto, PostgreSQL and 1, 2, then 3 `ingest` processes: prints figures,
//! and asserts only what is correctness rather than speed.
//!
//! ```text
//! cargo bench -p phg-tests --bench load                      # 1000 gateways, backlog 20 each
//! cargo bench -p phg-tests --bench load -- --quick           # 100 gateways, backlog 10: about a minute
//! cargo bench -p phg-tests --bench load -- --gateways 300    # any number (and --backlog, --steady-s, …)
//! ```
//!
//! For each instance count (1, 2, 3; `--instances 1,3` to choose), on a fresh Mosquitto and a fresh
//! database of one PostgreSQL server (`fsync = on`, as `ingest/benches/ingest.rs` measures), all on
//! loopback:
//!
//! 1. the `ingest` binaries start first, one `instance` each, one shared-subscription `group`, one
//!    database (a shared subscription keeps nothing for a group before a member subscribes, so nothing is
//!    published until every instance has its SUBACKs);
//! 2. **steady phase**: every gateway — its own MQTT client id, its own `phg/v1/<gateway>/readings` — sends
//!    one reading every `--interval-s` (10 s) for `--steady-s` (20 s), staggered: 100 readings/s from
//!    1000 gateways, QoS 1; the phase ends when all are stored;
//! 3. **burst**: every gateway disconnects, then all reconnect at once and flush a backlog of `--backlog`
//!    readings each (20 000 in all) as fast as QoS 1 allows (rumqttc's in-flight window of 100).
//!
//! The readings are real `phg.reading/1` messages built by `protocol` (a GLS glucose record or a BLS
//! blood-pressure record, `validate`d, [`ReadingMessage::new`]: deterministic version 5 ids), one
//! pseudonymous patient per gateway (`p-0001`), glucose and blood pressure alternating, all in range but
//! two per gateway in the backlog: a glucose of 45 mg/dL (GLU_HYPO_L2, CRITICAL) and one of 320 mg/dL
//! (GLU_HYPER_CN, URGENT). They are the only match of their rule family (GLU_LOW, GLU_HIGH) for the
//! patient, so each opens exactly one alert whatever order the instances evaluate them in: **alerts
//! expected = 2 × gateways**. Reading times are spaced 15 min apart in the backlog (more than the 10-min
//! BP session) and the window rules are pushed out to a day, so nothing else alerts.
//!
//! Figures per instance count: readings/s stored during the burst (its readings over its drain time);
//! p50/p99 latency from publish (the generator's clock when it hands the message to its client) to
//! `readings.stored_ms` (ingest's clock when the batch's transaction starts; the commit follows within
//! that batch's time) over the steady phase; the burst drain time, from the burst's first publish to its
//! last row stored; duplicates stored (rows beyond one per published reading: must be 0); alerts raised
//! (`alerts` rows) against expected (must be equal). Redeliveries ingest discarded as duplicates are
//! counted from its debug log and printed, not judged (QoS 1 allows them).
//!
//! Exit status: non-zero, with a message, when duplicates are stored, when alerts differ from expected,
//! when a reading is never stored, or after the global `--timeout-s` (600 s) — then with the rows
//! measured so far. Nothing else is asserted: speed is a figure.
//!
//! Needs `mosquitto` and PostgreSQL's server binaries (`.ci/run` installs both; skipped with a message
//! otherwise) and about 2 × gateways + 100 open files: the soft `RLIMIT_NOFILE` is raised to the hard
//! limit when lower (else `ulimit -n` it yourself).
//!
//! Mosquitto runs with `max_inflight_messages 256` (ingest's `mqtt.max_batch`): with its default of 20,
//! each ingest instance is never handed more than 20 unacknowledged messages, so no transaction holds
//! more than 20 readings. `--broker-defaults` measures that.
//!
//! One run on the 2-core build machine (2026-12-05), where Mosquitto, PostgreSQL, every ingest process and
//! the 1000-gateway generator share the two cores, so more instances compete for the same CPU:
//!
//! ```text
//! (filled in below from the run reported in docs/performance.md)
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ingest::testing::TempPostgres;
use phg_tests::TestBroker;
use phg_tests::process::{GatewayProcess, ingest_bin, log_field};
use protocol::gatt::time::DateTime;
use protocol::ieee11073::SFloat;
use protocol::model::{
    BloodPressureRecord, Glucose, GlucoseRecord, Measurement, Pressure, PressureUnit,
    RecordNumbering,
};
use protocol::validate::{Reception, validate};
use protocol::wire::{DeviceRef, ReadingMessage, Topics, is_valid_pseudonym};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The shared-subscription group every instance joins.
const GROUP: &str = "phg-load";
/// Mosquitto's per-client window towards ingest = ingest's default `mqtt.max_batch` (see the module doc).
const BROKER_EXTRA: &str = "max_inflight_messages 256";
/// Abnormal readings per gateway, each opening one alert (see the module doc).
const ALERTS_PER_GATEWAY: usize = 2;
/// The glucose values of the two abnormal readings, mg/dL: below 54 (GLU_HYPO_L2) and at least 300
/// (GLU_HYPER_CN, the default CN profile).
const HYPO_MG_DL: i32 = 45;
const HYPER_MG_DL: i32 = 320;
/// Backlog readings are this far apart (more than the 10-minute BP session of the rules).
const BACKLOG_SPACING_S: i64 = 900;

// ---------------------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    gateways: usize,
    backlog: usize,
    steady_s: u64,
    interval_s: u64,
    instances: Vec<usize>,
    timeout: Duration,
    broker_defaults: bool,
}

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick")
            || std::env::var("PHG_BENCH_QUICK").is_ok_and(|v| v == "1");
        let mut o = if quick {
            Opts {
                gateways: 100,
                backlog: 10,
                steady_s: 10,
                interval_s: 5,
                instances: vec![1, 2, 3],
                timeout: Duration::from_secs(240),
                broker_defaults: false,
            }
        } else {
            Opts {
                gateways: 1000,
                backlog: 20,
                steady_s: 20,
                interval_s: 10,
                instances: vec![1, 2, 3],
                timeout: Duration::from_secs(600),
                broker_defaults: false,
            }
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> String {
                it.next()
                    .unwrap_or_else(|| fail(&format!("{name} needs a value")))
                    .clone()
            };
            let number = |name: &str, v: String| -> u64 {
                v.parse()
                    .unwrap_or_else(|_| fail(&format!("{name}: not a number: {v}")))
            };
            match a.as_str() {
                "--quick" | "--bench" => {}
                "--broker-defaults" => o.broker_defaults = true,
                "--gateways" => o.gateways = number(a, value(a)) as usize,
                "--backlog" => o.backlog = number(a, value(a)) as usize,
                "--steady-s" => o.steady_s = number(a, value(a)),
                "--interval-s" => o.interval_s = number(a, value(a)),
                "--timeout-s" => o.timeout = Duration::from_secs(number(a, value(a))),
                "--instances" => {
                    o.instances = value(a)
                        .split(',')
                        .map(|n| number("--instances", n.trim().to_owned()) as usize)
                        .collect();
                }
                other => fail(&format!(
                    "unknown option {other}; options: --quick --gateways N --backlog N --steady-s S \
                     --interval-s S --instances 1,2,3 --timeout-s S --broker-defaults"
                )),
            }
        }
        // Two glucose readings in the backlog carry the abnormal values (readings 0 and 2 of it).
        if o.backlog < 4 || o.gateways == 0 || o.gateways > 9999 || o.interval_s == 0 {
            fail("need --backlog >= 4, 1 <= --gateways <= 9999, --interval-s >= 1");
        }
        if o.instances.is_empty() || o.instances.iter().any(|&n| n == 0 || n > 8) {
            fail("--instances: counts between 1 and 8");
        }
        o
    }

    /// Readings each gateway sends in the steady phase.
    fn steady_per_gateway(&self) -> usize {
        (self.steady_s / self.interval_s).max(1) as usize
    }
}

fn fail(message: &str) -> ! {
    eprintln!("load: {message}");
    std::process::exit(2)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// Readings, as a gateway publishes them
// ---------------------------------------------------------------------------------------------------------

/// One simulated home: a gateway, its patient, a glucose meter and a blood-pressure cuff.
#[derive(Debug, Clone)]
struct Home {
    gateway: String,
    patient: String,
    meter: String,
    cuff: String,
    topic: String,
}

impl Home {
    fn new(g: usize) -> Home {
        let gateway = format!("gw-load-{g:04}");
        let patient = format!("p-{g:04}");
        assert!(is_valid_pseudonym(&patient), "{patient} is a pseudonym");
        // Locally administered Bluetooth-style addresses, unique per home (the reading id's device part).
        let (hi, lo) = (g >> 8, g & 0xFF);
        Home {
            topic: Topics::for_gateway(&gateway).readings(),
            gateway,
            patient,
            meter: format!("02:00:00:00:{hi:02X}:{lo:02X}"),
            cuff: format!("06:00:00:00:{hi:02X}:{lo:02X}"),
        }
    }

    /// Reading number `n` of this home (glucose for even `n`, blood pressure for odd), measured and
    /// received at `time_utc`, with the glucose value `mg_dl` (ignored for blood pressure): its id and its
    /// `phg.reading/1` payload.
    fn reading(&self, n: usize, time_utc: i64, mg_dl: i32) -> (String, Vec<u8>) {
        let at = DateTime::from_epoch_seconds(time_utc).expect("a time RFC 3339 can carry");
        let (device, m) = if n.is_multiple_of(2) {
            let g = GlucoseRecord {
                sequence_number: u16::try_from(n / 2 + 1)
                    .expect("fewer than 65 535 glucose readings"),
                numbering: RecordNumbering::Gls,
                base_time: at,
                time_offset_min: Some(0),
                // GLS carries kg/L: mg/dL × 10⁻⁵.
                concentration: Some(Glucose::from_wire(
                    SFloat::new(mg_dl, -5).expect("a glucose SFLOAT"),
                    false,
                )),
                sample_type: Some(1),
                sample_location: Some(1),
                sensor_status: Some(0),
                context: None,
            };
            (&self.meter, Measurement::Glucose(g))
        } else {
            let p = |v: i32| Pressure {
                raw: SFloat::new(v, 0).expect("a pressure SFLOAT"),
                unit: PressureUnit::MmHg,
            };
            // 116–125 / 76 mmHg, MAP as a cuff computes it: within every BP rule's normal range.
            let sys = 116 + (n % 10) as i32;
            let b = BloodPressureRecord {
                systolic: p(sys),
                diastolic: p(76),
                mean_arterial_pressure: p(76 + (sys - 76) / 3),
                timestamp: Some(at),
                pulse_rate: Some(SFloat::new(70, 0).expect("a pulse SFLOAT")),
                user_id: Some(1),
                measurement_status: Some(0),
            };
            (&self.cuff, Measurement::BloodPressure(b))
        };
        let rx = Reception {
            received_utc: time_utc,
            clock_offset_s: Some(0),
        };
        let verdict = validate(&m, &rx);
        let msg = ReadingMessage::new(
            &self.gateway,
            &self.patient,
            DeviceRef::new(device),
            &m,
            &verdict,
            &rx,
        )
        .expect("a patient reading");
        let payload = serde_json::to_vec(&msg).expect("a reading serialises");
        (msg.id, payload)
    }
}

/// An in-range glucose, varied a little (CN pre-meal target 4.4–7.0 mmol/L; no context is read as
/// non-fasting, whose ceiling is higher).
fn normal_mg_dl(g: usize, n: usize) -> i32 {
    95 + ((g + n) % 25) as i32
}

// ---------------------------------------------------------------------------------------------------------
// One gateway's MQTT connection
// ---------------------------------------------------------------------------------------------------------

/// A clean-session rumqttc connection (MQTT 3.1.1, as the gateway's uplink speaks by default), its event
/// loop polled by a task that counts PUBACKs.
#[derive(Debug)]
struct Conn {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    sent: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Conn {
    /// Connects as `client_id`; returns once the broker's CONNACK came (reconnecting until it does: 1000
    /// simultaneous connects may overflow the listen backlog).
    async fn open(client_id: &str, broker: SocketAddr) -> Conn {
        let mut opts = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 128);
        let acked = Arc::new(AtomicUsize::new(0));
        let (connected_tx, mut connected) = watch::channel(false);
        let count = Arc::clone(&acked);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = connected_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    // rumqttc reconnects on the next poll and resends what was not acknowledged.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        connected
            .wait_for(|c| *c)
            .await
            .expect("the connection task ended before its CONNACK");
        Conn {
            client,
            acked,
            sent: 0,
            task,
        }
    }

    /// Hands a QoS 1 message to the client; returns the time it did (the latency's start).
    async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> i64 {
        let t = now_ms();
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("the client's request queue is open");
        self.sent += 1;
        t
    }

    /// Waits for every PUBACK, then disconnects.
    async fn close(self) {
        while self.acked.load(Ordering::SeqCst) < self.sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.client
            .disconnect()
            .await
            .expect("the client's request queue is open");
        let _ = self.task.await;
    }
}

/// What the generator published: reading id → publish time (ms), per phase.
#[derive(Debug, Default)]
struct Published {
    steady: HashMap<String, i64>,
    burst: HashMap<String, i64>,
}

// ---------------------------------------------------------------------------------------------------------
// The processes
// ---------------------------------------------------------------------------------------------------------

/// Starts `ingest` instance `name` on `broker` and `db_url`; returns once its three subscriptions
/// (readings, events, symptoms) are acknowledged.
async fn start_ingest(
    dir: &Path,
    name: &str,
    broker: &TestBroker,
    db_url: &str,
) -> Result<GatewayProcess, String> {
    let config = dir.join(format!("{name}.toml"));
    // window_interval_s: a day, so that the window rules (7-day averages, adherence) do not run during
    // the measurement; nothing in these readings would match them anyway.
    let text = format!(
        "instance = \"{name}\"\ndata_dir = {data:?}\n\
         [mqtt]\nbroker = \"{url}\"\ngroup = \"{GROUP}\"\nkeep_alive_s = 30\n\
         [database]\nurl = \"{db_url}\"\n\
         [rules]\nwindow_interval_s = 86400\n",
        data = dir.join(name).display().to_string(),
        url = broker.url(),
    );
    std::fs::write(&config, text).expect("writing the ingest configuration");
    // ingest::service logs its SUBACKs and each batch (with its duplicates) at debug.
    let log = std::ffi::OsStr::new("info,ingest::service=debug");
    let p = GatewayProcess::spawn_exe_with_env(
        &ingest_bin(),
        &["run".as_ref(), "--config".as_ref(), config.as_os_str()],
        &[("RUST_LOG", log)],
    )
    .expect("starting ingest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_lines(&p, "subscribed") < 3 {
        if Instant::now() > deadline {
            return Err(format!(
                "ingest {name} did not subscribe within 60 s; its log:\n{}",
                p.stderr().text()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(p)
}

fn count_lines(p: &GatewayProcess, needle: &str) -> usize {
    p.stderr()
        .all()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Redeliveries an instance recognised and stored nothing for (`duplicates=` of its "batch stored" lines).
fn redeliveries(p: &GatewayProcess) -> u64 {
    p.stderr()
        .all()
        .iter()
        .filter(|l| l.contains("batch stored"))
        .filter_map(|l| log_field(l, "duplicates").and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

async fn connect_db(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting to the bench's PostgreSQL");
    tokio::spawn(conn);
    client
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> Result<i64, String> {
    db.query_one(sql, &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| format!("{sql}: {e}"))
}

/// Waits until `readings` holds `want` rows; fails (with why) when an instance exits or `bad_messages`
/// grows, since then it never will.
async fn wait_stored(
    db: &tokio_postgres::Client,
    want: usize,
    instances: &mut [GatewayProcess],
    stage: &Stage,
) -> Result<(), String> {
    loop {
        let n = count(db, "SELECT count(*) FROM readings").await?;
        stage.set(format!(
            "waiting for the database: {n} of {want} readings stored"
        ));
        if n >= want as i64 {
            return Ok(());
        }
        let bad = count(db, "SELECT count(*) FROM bad_messages").await?;
        if bad > 0 {
            let why: String = db
                .query_one("SELECT error FROM bad_messages LIMIT 1", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or_default();
            return Err(format!(
                "{bad} messages went to bad_messages (first: {why})"
            ));
        }
        for p in instances.iter_mut() {
            if !p.is_running().unwrap_or(false) {
                return Err(format!(
                    "an ingest instance exited; its log:\n{}",
                    p.stderr().text()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// One instance count
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Row {
    instances: usize,
    readings_per_s: f64,
    p50_ms: i64,
    p99_ms: i64,
    burst_p50_ms: i64,
    burst_p99_ms: i64,
    drain_s: f64,
    duplicates: i64,
    alerts: i64,
    alerts_expected: i64,
    redelivered: u64,
    alerts_by_rule: String,
}

/// What the run is doing, for the timeout's message.
#[derive(Debug, Clone, Default)]
struct Stage(Arc<Mutex<String>>);

impl Stage {
    fn set(&self, s: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn run_one(o: &Opts, pg: &TempPostgres, k: usize, stage: &Stage) -> Result<Row, String> {
    let label = format!("[{k} instance{}]", if k == 1 { "" } else { "s" });
    stage.set(format!(
        "{label} starting Mosquitto, the database and ingest"
    ));
    let extra = if o.broker_defaults { "" } else { BROKER_EXTRA };
    let broker = TestBroker::start_mosquitto_with(extra)
        .ok_or("mosquitto is not installed")?
        .map_err(|e| format!("starting mosquitto: {e}"))?;
    let db_url = pg
        .create_database(&format!("load_{k}"))
        .await
        .map_err(|e| format!("creating the database: {e}"))?;
    let dir = tempfile::Builder::new()
        .prefix("phg-load-")
        .tempdir()
        .expect("a temporary directory");
    // One after the other: the first applies the schema's migrations, which two at once could race on.
    let mut instances = Vec::new();
    for i in 0..k {
        instances.push(start_ingest(dir.path(), &format!("load-{i}"), &broker, &db_url).await?);
    }
    let db = connect_db(&db_url).await;
    let homes: Arc<Vec<Home>> = Arc::new((0..o.gateways).map(Home::new).collect());
    let published = Arc::new(Mutex::new(Published::default()));

    // Steady phase: every gateway connected, then one reading each per interval, staggered.
    stage.set(format!("{label} connecting {} gateways", o.gateways));
    let addr = broker.addr();
    let mut conns = JoinSet::new();
    for (g, home) in homes.iter().enumerate() {
        let id = format!("{}-uplink", home.gateway);
        conns.spawn(async move { (g, Conn::open(&id, addr).await) });
    }
    let mut open: Vec<Option<Conn>> = (0..o.gateways).map(|_| None).collect();
    while let Some(r) = conns.join_next().await {
        let (g, c) = r.expect("a connecting task");
        open[g] = Some(c);
    }
    let per = o.steady_per_gateway();
    stage.set(format!(
        "{label} steady phase: {} readings/s for {} s",
        o.gateways as u64 / o.interval_s,
        o.steady_s
    ));
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs(o.interval_s);
    let mut tasks = JoinSet::new();
    for (g, c) in open.into_iter().enumerate() {
        let mut c = c.expect("every gateway connected");
        let (homes, published) = (Arc::clone(&homes), Arc::clone(&published));
        let offset = interval.mul_f64(g as f64 / o.gateways as f64);
        tasks.spawn(async move {
            let home = &homes[g];
            for n in 0..per {
                tokio::time::sleep_until(start + offset + interval * n as u32).await;
                let (id, payload) = home.reading(n, now_ms() / 1000, normal_mg_dl(g, n));
                let t = c.publish(&home.topic, payload).await;
                published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .steady
                    .insert(id, t);
            }
            // The outage: the gateway's connection goes.
            c.close().await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a steady-phase gateway task");
    }
    let steady_n = o.gateways * per;
    wait_stored(&db, steady_n, &mut instances, stage).await?;

    // Burst: every gateway reconnects at once and flushes its backlog, readings 15 min apart ending now.
    stage.set(format!(
        "{label} burst: {} gateways reconnecting with {} readings each",
        o.gateways, o.backlog
    ));
    let burst_now = now_ms() / 1000;
    for (g, home) in homes.iter().enumerate() {
        let (homes, published) = (Arc::clone(&homes), Arc::clone(&published));
        let backlog = o.backlog;
        let id = format!("{}-uplink", home.gateway);
        tasks.spawn(async move {
            let home = &homes[g];
            let mut c = Conn::open(&id, addr).await;
            let mut mine = Vec::with_capacity(backlog);
            for b in 0..backlog {
                let n = per + b;
                // The backlog's first two glucose readings (b = 0 and b = 2 when `per` is even, else
                // b = 1 and 3) are the abnormal ones.
                let glucose_index = b / 2;
                let mg = match (n.is_multiple_of(2), glucose_index) {
                    (true, 0) => HYPO_MG_DL,
                    (true, 1) => HYPER_MG_DL,
                    _ => normal_mg_dl(g, n),
                };
                let t = burst_now - (backlog - b) as i64 * BACKLOG_SPACING_S;
                let (id, payload) = home.reading(n, t, mg);
                mine.push((id, c.publish(&home.topic, payload).await));
            }
            c.close().await;
            published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .burst
                .extend(mine);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a burst gateway task");
    }
    let burst_n = o.gateways * o.backlog;
    wait_stored(&db, steady_n + burst_n, &mut instances, stage).await?;
    stage.set(format!("{label} measuring"));

    let published = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
    let unique: HashSet<&String> = published
        .steady
        .keys()
        .chain(published.burst.keys())
        .collect();
    assert_eq!(
        unique.len(),
        steady_n + burst_n,
        "every published reading has its own id"
    );
    let rows = db
        .query("SELECT id, stored_ms FROM readings", &[])
        .await
        .expect("reading the stored readings");
    let stored: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let first_copies = stored.keys().filter(|id| unique.contains(id)).count();
    let duplicates = rows.len() as i64 - first_copies as i64;
    let latencies = |of: &HashMap<String, i64>| {
        let mut v: Vec<i64> = of
            .iter()
            .filter_map(|(id, t)| stored.get(id).map(|s| s - t))
            .collect();
        v.sort_unstable();
        v
    };
    let steady = latencies(&published.steady);
    let burst = latencies(&published.burst);
    let first_publish = published.burst.values().min().copied().unwrap_or(0);
    let last_stored = published
        .burst
        .keys()
        .filter_map(|id| stored.get(id))
        .max()
        .copied()
        .unwrap_or(first_publish);
    let drain_s = (last_stored - first_publish).max(1) as f64 / 1000.0;
    let alerts = count(&db, "SELECT count(*) FROM alerts").await?;
    let by_rule = db
        .query(
            "SELECT rule_id, count(*) FROM alerts GROUP BY rule_id ORDER BY rule_id",
            &[],
        )
        .await
        .expect("counting alerts by rule");
    let mut alerts_by_rule = String::new();
    for r in &by_rule {
        let (rule, n): (String, i64) = (r.get(0), r.get(1));
        let _ = write!(alerts_by_rule, "{rule} {n}  ");
    }
    let rejected = count(
        &db,
        "SELECT count(*) FROM readings WHERE eval_error IS NOT NULL",
    )
    .await?;
    if rejected > 0 {
        eprintln!("{label} warning: {rejected} readings stored as rejected (eval_error)");
    }
    let redelivered = instances.iter().map(redeliveries).sum();
    for p in instances {
        if let Err(e) = p.terminate(Duration::from_secs(15)).await {
            eprintln!("{label} warning: {e}");
        }
    }
    drop(broker);
    Ok(Row {
        instances: k,
        readings_per_s: burst_n as f64 / drain_s,
        p50_ms: percentile(&steady, 0.50),
        p99_ms: percentile(&steady, 0.99),
        burst_p50_ms: percentile(&burst, 0.50),
        burst_p99_ms: percentile(&burst, 0.99),
        drain_s,
        duplicates,
        alerts,
        alerts_expected: (o.gateways * ALERTS_PER_GATEWAY) as i64,
        redelivered,
        alerts_by_rule: alerts_by_rule.trim_end().to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------------------

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "instances | readings/s | p50 ms | p99 ms | burst drain s | duplicates | alerts raised/expected\n\
         ----------|------------|--------|--------|---------------|------------|-----------------------\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>9} | {:>10.0} | {:>6} | {:>6} | {:>13.2} | {:>10} | {:>10}/{}",
            r.instances,
            r.readings_per_s,
            r.p50_ms,
            r.p99_ms,
            r.drain_s,
            r.duplicates,
            r.alerts,
            r.alerts_expected
        );
    }
    s
}

fn details(rows: &[Row]) -> String {
    let mut s = String::new();
    for r in rows {
        let _ = writeln!(
            s,
            "  {} instance(s): burst publish → stored p50 {} ms, p99 {} ms; redeliveries ingest discarded: {}; \
             alerts by rule: {}",
            r.instances, r.burst_p50_ms, r.burst_p99_ms, r.redelivered, r.alerts_by_rule
        );
    }
    s
}

fn scaling(rows: &[Row]) -> String {
    let Some(base) = rows.first() else {
        return "scaling: no run completed".into();
    };
    let mut parts: Vec<String> = rows
        .iter()
        .skip(1)
        .map(|r| {
            format!(
                "{} instances {:.2}×",
                r.instances,
                r.readings_per_s / base.readings_per_s
            )
        })
        .collect();
    if parts.is_empty() {
        parts.push("one instance count only".into());
    }
    format!(
        "scaling (burst readings/s relative to {} instance{}): {}",
        base.instances,
        if base.instances == 1 { "" } else { "s" },
        parts.join(", ")
    )
}

fn failures(rows: &[Row]) -> Vec<String> {
    let mut f = Vec::new();
    for r in rows {
        if r.duplicates != 0 {
            f.push(format!(
                "{} instance(s): {} duplicate readings stored (must be 0)",
                r.instances, r.duplicates
            ));
        }
        if r.alerts != r.alerts_expected {
            f.push(format!(
                "{} instance(s): {} alerts raised, {} expected ({})",
                r.instances, r.alerts, r.alerts_expected, r.alerts_by_rule
            ));
        }
    }
    f
}

/// Raises the soft open-file limit to the hard one when it is below what the run needs (this process
/// holds one socket per gateway, and Mosquitto, which inherits the limit, as many).
fn raise_nofile(gateways: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let need = 2 * gateways as u64 + 256;
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    if current >= need {
        return;
    }
    let raised = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    if setrlimit(Resource::Nofile, raised).is_err() || lim.maximum.unwrap_or(u64::MAX) < need {
        fail(&format!(
            "{gateways} gateways need about {need} open files; the limit is {current} \
             (hard {:?}): raise it with `ulimit -n {need}`",
            lim.maximum
        ));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let o = Opts::parse();
    if phg_tests::mosquitto_path().is_none() {
        println!("load: skipped: needs Mosquitto");
        return ExitCode::SUCCESS;
    }
    raise_nofile(o.gateways);
    let Some(pg) = TempPostgres::start(true).expect("starting PostgreSQL") else {
        println!("load: {}", ingest::testing::SKIP_MESSAGE);
        return ExitCode::SUCCESS;
    };
    // Built (release) before the clock starts.
    let _ = ingest_bin();
    println!(
        "load: {} gateways, steady {} s at one reading per {} s each ({} readings/s), then a burst of {} \
         readings each ({} in all); Mosquitto {}; PostgreSQL fsync on; {} CPUs",
        o.gateways,
        o.steady_s,
        o.interval_s,
        o.gateways as u64 / o.interval_s,
        o.backlog,
        o.gateways * o.backlog,
        if o.broker_defaults {
            "defaults (max_inflight_messages 20)"
        } else {
            BROKER_EXTRA
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let stage = Stage::default();
    let rows: Arc<Mutex<Vec<Row>>> = Arc::default();
    let all = {
        let (o, rows, stage, pg) = (&o, Arc::clone(&rows), stage.clone(), &pg);
        async move {
            for &k in &o.instances {
                let t = Instant::now();
                let row = run_one(o, pg, k, &stage).await?;
                eprintln!(
                    "load: {k} instance(s) done in {:.0} s: {:.0} readings/s, drain {:.2} s",
                    t.elapsed().as_secs_f64(),
                    row.readings_per_s,
                    row.drain_s
                );
                rows.lock().unwrap_or_else(|p| p.into_inner()).push(row);
            }
            Ok::<(), String>(())
        }
    };
    // On timeout the run's future is dropped: its brokers, databases and ingest processes with it.
    let outcome = tokio::time::timeout(o.timeout, all).await;
    let rows = rows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!();
    print!("{}", table(&rows));
    println!(
        "readings/s: the burst's readings over its drain time; p50/p99: publish → stored, steady phase"
    );
    print!("{}", details(&rows));
    println!("{}", scaling(&rows));
    let mut bad = failures(&rows);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bad.push(format!("{}: {e}", stage.get())),
        Err(_) => bad.push(format!(
            "timed out after {} s while: {}",
            o.timeout.as_secs(),
            stage.get()
        )),
    }
    drop(pg);
    if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        for b in &bad {
            eprintln!("load: FAILED: {b}");
        }
        ExitCode::FAILURE
    }
}
