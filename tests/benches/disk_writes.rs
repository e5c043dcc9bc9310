//! Steady-state disk writes of the real `gateway run` process (issue 14 item 6): prints figures, asserts
//! nothing.
//!
//! ```text
//! cargo bench -p phg-tests --bench disk_writes                 # release build
//! cargo test  -p phg-tests --bench disk_writes                 # the same run on the debug build
//! PHG_DISK_BENCH_S=120 cargo bench -p phg-tests --bench disk_writes
//! ```
//!
//! A local broker (Mosquitto, or the embedded rumqttd, labelled), a subscriber on the gateway's topics,
//! and the gateway binary with simulated devices measuring one reading a second in all, edge alerts on
//! (their state file beside the journal), everything in a temporary directory. After a warm-up, for
//! `PHG_DISK_BENCH_S` seconds (default 60):
//!
//! - bytes written: `write_bytes` of `/proc/PID/io` (what the process made the kernel write to storage,
//!   counted per page dirtied: 4 KiB for a page written again after an fsync cleaned it);
//! - fsyncs: `fsync` + `fdatasync` calls, from `strace -f` (installed on the CI image; without it the
//!   figure is left out and the bench says so); renames too (each is a state file replaced whole);
//! - readings: the reading messages the subscriber received (accepted and delivered) in the window;
//!   the edge alert decisions (`…/alerts` messages) are counted too: the simulated meter's random values
//!   cross a threshold now and then, and each decision is one more journaled record (not a snapshot of
//!   the edge-alert state: a restart replays it from the journal), so they are part of the cost.
//!
//! Two ways devices hand over a reading a second: a meter that syncs every 10 s (what a BLE device that
//! keeps its records and connects now and then does: a few readings per session, committed together),
//! the headline figure; the same with a rule file whose level-1 high glucose threshold is 130 mg/dL, so
//! that the engine decides every few readings (`gateway_alerting`: what edge alerts add, measured); and
//! one reading per session (the worst case: each reading its own commit).
//! Lines: `BYTES_PER_READING gateway X`, `FSYNCS_PER_READING gateway Y` (headline), and the same with
//! `gateway_alerting` and `gateway_one_per_session`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phg_tests::process::gateway_bin;
use phg_tests::{Subscriber, TestBroker};

const GW: &str = "gw-disk";

/// One scenario's figures over the measured window.
#[derive(Debug)]
struct Figures {
    readings: usize,
    /// Edge alert decisions in the window: each is a journaled record.
    alerts: usize,
    bytes: u64,
    fsyncs: Option<u64>,
    renames: Option<u64>,
    seconds: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn strace_path() -> Option<PathBuf> {
    ["/usr/bin/strace", "/bin/strace"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `write_bytes` of `/proc/PID/io` (the whole process: every thread).
fn write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

/// The gateway's pid: `child` itself, or the process `child` (strace) started.
fn gateway_pid(child: &Child, traced: bool) -> Option<u32> {
    if !traced {
        return Some(child.id());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Counts the traced calls started within `[from, to]` (Unix seconds) in strace's `-ttt` output.
fn count_calls(trace: &Path, from: f64, to: f64) -> (u64, u64) {
    let Ok(file) = std::fs::File::open(trace) else {
        return (0, 0);
    };
    let (mut fsyncs, mut renames) = (0, 0);
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        // `PID SECONDS.MICROS call(args) = result`, or a `<... call resumed>` second half (not counted).
        let mut parts = line.split_whitespace();
        let (Some(_pid), Some(t), Some(call)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(t) = t.parse::<f64>() else { continue };
        if t < from || t > to {
            continue;
        }
        if call.starts_with("fsync(") || call.starts_with("fdatasync(") {
            fsyncs += 1;
        } else if call.starts_with("rename") {
            renames += 1;
        }
    }
    (fsyncs, renames)
}

/// The built-in rules with the level-1 high glucose threshold at 130 mg/dL instead of 180: about the
/// middle of the simulated meter's values (~100–156 mg/dL), so readings cross it back and forth and the
/// engine decides (opens, confirms, closes episodes) every few readings (17 decisions for 60 readings in
/// one run) — far more often than a patient's alerts would, which makes it the edge alerts' worst case,
/// measured rather than estimated.
fn alerting_rules() -> String {
    const LEVEL_1: &str = "[rule.threshold.value]\nop = \">\"\nmg_dl = 180\nmmol_l = 10.0\n";
    let rules = protocol::rules::DEFAULT_RULES_TOML;
    assert!(
        rules.contains(LEVEL_1),
        "the built-in rules no longer have the level-1 high threshold this bench lowers"
    );
    rules.replacen(
        LEVEL_1,
        "[rule.threshold.value]\nop = \">\"\nmg_dl = 130\nmmol_l = 7.2\n",
        1,
    )
}

fn config(broker: &TestBroker, dir: &Path, connect_every_s: u64, alerting: bool) -> String {
    let version = format!("version = \"{}\"\n", broker.mqtt_version_setting());
    let alerts = if alerting {
        let file = dir.join("rules.toml");
        std::fs::write(&file, alerting_rules()).expect("write the rules file");
        format!(
            "[alerts]\nrules_file = {:?}\n\n",
            file.display().to_string()
        )
    } else {
        String::new()
    };
    format!(
        "gateway_id = \"{GW}\"\n\n[mqtt]\nbroker = \"{url}\"\n{version}\n[journal]\ndir = {journal:?}\n\n{alerts}\
         [[simulated]]\nkind = \"glucometer\"\nid = \"meter-disk\"\nstored = 0\nmeasure_every_s = 1\n\
         connect_every_s = {connect_every_s}\n\n\
         [[bindings]]\ndevice = \"meter-disk\"\npatient = \"p-disk-0001\"\n",
        url = broker.url(),
        journal = dir.join("journal").display().to_string(),
    )
}

async fn run(
    broker: &TestBroker,
    connect_every_s: u64,
    alerting: bool,
    window: Duration,
) -> Option<Figures> {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, config(broker, dir.path(), connect_every_s, alerting))
        .expect("write config");
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/#"))
        .await
        .expect("subscriber");
    let count = |sub: &mut Subscriber, what: &str| {
        let topic = format!("phg/v1/{GW}/{what}");
        sub.received().iter().filter(|r| r.topic == topic).count()
    };
    let trace = dir.path().join("strace.txt");
    let strace = strace_path();
    let gateway = gateway_bin();
    let mut cmd = match &strace {
        Some(s) => {
            let mut c = Command::new(s);
            c.args(["-f", "-qq", "-ttt", "-e"])
                .arg("trace=fsync,fdatasync,rename,renameat,renameat2")
                .arg("-o")
                .arg(&trace)
                .arg(&gateway);
            c
        }
        None => Command::new(&gateway),
    };
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start the gateway");
    let Some(pid) = gateway_pid(&child, strace.is_some()) else {
        eprintln!("the gateway process did not start under strace");
        let _ = child.kill();
        let _ = child.wait();
        return None;
    };
    // Warm-up: the first readings delivered, then a few seconds more (start-up writes are not steady
    // state: the journal's first segment, the first edge-alert snapshot).
    sub.wait_for(1, Duration::from_secs(30)).await;
    sub.collect_for(Duration::from_secs(5 + connect_every_s))
        .await;
    let (t0, b0) = (unix_now(), write_bytes(pid));
    let (n0, a0) = (count(&mut sub, "readings"), count(&mut sub, "alerts"));
    sub.collect_for(window).await;
    let (t1, b1) = (unix_now(), write_bytes(pid));
    let (n1, a1) = (count(&mut sub, "readings"), count(&mut sub, "alerts"));
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("a pid"),
        rustix::process::Signal::TERM,
    );
    let _ = child.wait();
    let (fsyncs, renames) = match strace {
        Some(_) => {
            let (f, r) = count_calls(&trace, t0, t1);
            (Some(f), Some(r))
        }
        None => (None, None),
    };
    Some(Figures {
        readings: n1.saturating_sub(n0),
        alerts: a1.saturating_sub(a0),
        bytes: b1?.saturating_sub(b0?),
        fsyncs,
        renames,
        seconds: t1 - t0,
    })
}

fn print(label: &str, f: &Figures) {
    let per = |x: u64| x as f64 / f.readings.max(1) as f64;
    println!(
        "  {label}: {} readings ({} edge alert decisions) in {:.0} s, {} bytes written, {} fsyncs, {} renames",
        f.readings,
        f.alerts,
        f.seconds,
        f.bytes,
        f.fsyncs.map_or("?".into(), |n| n.to_string()),
        f.renames.map_or("?".into(), |n| n.to_string()),
    );
    println!("BYTES_PER_READING {label} {:.0}", per(f.bytes));
    match f.fsyncs {
        Some(n) => println!("FSYNCS_PER_READING {label} {:.2}", per(n)),
        None => println!("FSYNCS_PER_READING {label} unmeasured (strace not installed)"),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let window = Duration::from_secs(
        std::env::var("PHG_DISK_BENCH_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let broker = TestBroker::start().expect("a broker");
        println!(
            "disk writes at 1 reading/s, {} s each, broker {} (goal: <= 2048 bytes and <= 1 fsync per reading)",
            window.as_secs(),
            broker.kind()
        );
        if strace_path().is_none() {
            println!("  strace not installed (apt-get install -y strace): fsyncs not counted");
        }
        for (label, connect_every_s, alerting) in [
            ("gateway", 10, false),
            ("gateway_alerting", 10, true),
            ("gateway_one_per_session", 1, false),
        ] {
            match run(&broker, connect_every_s, alerting, window).await {
                Some(f) => print(label, &f),
                None => println!("  {label}: no figures (see above)"),
            }
        }
    });
}
