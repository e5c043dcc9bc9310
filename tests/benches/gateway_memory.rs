//! Memory of the real `gateway run` process with 10 simulated devices (issue 15 item 2: peak RSS ≤ 12 MB):
//! prints figures, asserts nothing.
//!
//! ```text
//! cargo bench -p phg-tests --bench gateway_memory                        # release build
//! PHG_MEMORY_BENCH_STORED=5000 cargo bench -p phg-tests --bench gateway_memory
//! ```
//!
//! `tests/benches/pipeline.rs` (d) measures its own process, which also holds the benchmark's runtime, its
//! pre-generated inputs and its clients; this one measures the gateway alone, as a Pi runs it: the release
//! binary, a local broker (Mosquitto, or the embedded rumqttd, labelled), 5 simulated glucometers and 5
//! simulated cuffs (two users each), each bound to a patient, edge alerts on, everything in a temporary
//! directory. Two phases:
//!
//! - **catch-up**: every device starts with `PHG_MEMORY_BENCH_STORED` records in its memory (default
//!   2 000, 20 000 in all), as after days offline: downloaded in sessions, journaled, published; the
//!   phase ends when the subscriber has them all;
//! - **steady**: then each device measures once a second (10 readings/s in all) for
//!   `PHG_MEMORY_BENCH_S` seconds (default 30).
//!
//! `/proc/PID/status` is sampled every 50 ms: the peak `VmRSS` and `VmHWM` (the kernel's own peak) of
//! each phase, and the RSS at the end. Lines: `RSS_PEAK_MB gateway_process_10_devices X` (the whole run's
//! VmHWM) and `RSS_STEADY_MB gateway_process_10_devices Y` (the steady phase's peak).
//!
//! The gateway runs with the environment the packaged service gives it (the `Environment=` lines of
//! `packaging/gateway/phg-gateway.service`: `MALLOC_ARENA_MAX`), and then once more without it, for
//! comparison. The binary is this build's (`target/release/gateway`, with the embedded broker `demo`
//! needs); the packaged one is smaller and so is its resident text, more so with its hot functions first:
//! `cargo build --profile dist -p gateway --no-default-features`, `packaging/order-text.sh dist` and
//! `PHG_GATEWAY_BIN=target/dist/gateway cargo bench -p phg-tests --bench gateway_memory`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use phg_tests::process::{gateway_bin, service_environment};
use phg_tests::{Subscriber, TestBroker};

const GW: &str = "gw-mem";
const METERS: usize = 5;
const CUFFS: usize = 5;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A `/proc/PID/status` field in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn config(broker: &TestBroker, dir: &std::path::Path, stored: u64, measure: bool) -> String {
    let version = format!("version = \"{}\"\n", broker.mqtt_version_setting());
    let measure_every_s = u64::from(measure);
    let mut c = format!(
        "gateway_id = \"{GW}\"\n\n[mqtt]\nbroker = \"{url}\"\n{version}\n[journal]\ndir = {journal:?}\n\n",
        url = broker.url(),
        journal = dir.join("journal").display().to_string(),
    );
    for i in 0..METERS {
        c += &format!(
            "[[simulated]]\nkind = \"glucometer\"\nid = \"meter-{i}\"\nstored = {stored}\n\
             measure_every_s = {measure_every_s}\nconnect_every_s = 5\n\n\
             [[bindings]]\ndevice = \"meter-{i}\"\npatient = \"p-mem-g{i:03}\"\n\n"
        );
    }
    for i in 0..CUFFS {
        c += &format!(
            "[[simulated]]\nkind = \"cuff\"\nid = \"cuff-{i}\"\nstored = {stored}\nusers = [1, 2]\n\
             measure_every_s = {measure_every_s}\nconnect_every_s = 5\n\n\
             [[bindings]]\ndevice = \"cuff-{i}\"\nuser_id = 1\npatient = \"p-mem-c{i:03}a\"\n\n\
             [[bindings]]\ndevice = \"cuff-{i}\"\nuser_id = 2\npatient = \"p-mem-c{i:03}b\"\n\n"
        );
    }
    c
}

/// The peak VmRSS seen while `until` runs, sampling every 50 ms.
async fn sample_while<F: std::future::Future>(pid: u32, until: F) -> (u64, F::Output) {
    tokio::pin!(until);
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            out = &mut until => return (peak, out),
            _ = tick.tick() => {
                peak = peak.max(status_kb(pid, "VmRSS").unwrap_or(0));
            }
        }
    }
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// One run: catch-up, then steady; prints its lines under `label`.
async fn run(
    broker: &TestBroker,
    stored: u64,
    steady: Duration,
    label: &str,
    env: &[(String, String)],
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, config(broker, dir.path(), stored, true)).expect("write config");
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/readings"))
        .await
        .expect("subscriber");
    let mut child = Command::new(gateway_bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let pid = child.id();
    let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{label} (environment: {})",
        if shown.is_empty() {
            "none".into()
        } else {
            shown.join(" ")
        }
    );
    let started = Instant::now();
    // A glucometer's `stored` records are its whole memory; a cuff's are shared by its users.
    let backlog = (METERS + CUFFS) as u64 * stored;
    let (catch_up_peak, _) = sample_while(
        pid,
        sub.wait_for(backlog as usize, Duration::from_secs(600)),
    )
    .await;
    let catch_up = started.elapsed();
    let delivered = sub.received().len();
    let hwm_catch_up = status_kb(pid, "VmHWM").unwrap_or(0);
    if backlog == 0 {
        println!("  catch-up: none (no stored records)");
    } else {
        println!(
            "  catch-up: {delivered} readings delivered in {:.1} s; peak VmRSS {}, VmHWM {}",
            catch_up.as_secs_f64(),
            mb(catch_up_peak),
            mb(hwm_catch_up)
        );
    }
    let before = sub.received().len();
    let (steady_peak, _) = sample_while(pid, sub.collect_for(steady)).await;
    let steady_readings = sub.received().len() - before;
    let rss_end = status_kb(pid, "VmRSS").unwrap_or(0);
    let anon_end = status_kb(pid, "RssAnon").unwrap_or(0);
    let hwm = status_kb(pid, "VmHWM").unwrap_or(0);
    println!(
        "  steady: {steady_readings} readings in {} s; peak VmRSS {}; at the end VmRSS {} (heap and stacks {})",
        steady.as_secs(),
        mb(steady_peak),
        mb(rss_end),
        mb(anon_end)
    );
    println!("RSS_PEAK_MB {label} {:.1}", hwm as f64 / 1024.0);
    println!("RSS_STEADY_MB {label} {:.1}", steady_peak as f64 / 1024.0);
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("a pid"),
        rustix::process::Signal::TERM,
    );
    let _ = child.wait();
}

fn main() {
    let stored = env_or("PHG_MEMORY_BENCH_STORED", 2_000);
    let steady = Duration::from_secs(env_or("PHG_MEMORY_BENCH_S", 30));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let broker = TestBroker::start().expect("a broker");
        println!(
            "gateway process memory: {}, 10 simulated devices ({METERS} glucometers, {CUFFS} cuffs with 2 users), \
             {stored} stored records each, edge alerts on, broker {} (goal: peak RSS <= 12 MB)",
            gateway_bin().display(),
            broker.kind()
        );
        run(&broker, stored, steady, "gateway_process_10_devices", &service_environment()).await;
        run(&broker, stored, steady, "gateway_process_10_devices_no_service_environment", &[]).await;
    });
}
