//! systemd's notify protocol, as the packaged unit (`Type=notify`, `WatchdogSec=`) relies on it: the real
//! `gateway` binary under a fake `NOTIFY_SOCKET` (a Unix datagram socket in a temporary directory, what
//! systemd hands a service), a real Mosquitto, a simulated glucometer.
//!
//! READY=1 arrives once the gateway runs; WATCHDOG=1 arrives every half interval while every long-lived
//! task checks in, and stops when one is wedged (the debug-build hook `PHG_TEST_WEDGE_FILE`: the named
//! task's check-ins are ignored), so systemd would restart it; STOPPING=1 arrives on SIGTERM. The ingest
//! binary: READY=1 and STOPPING=1.

// A test binary: a failed set-up step is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use phg_tests::TestBroker;
use phg_tests::process::{GatewayProcess, gateway_bin, ingest_bin};

/// The watchdog interval given to the gateway (`WATCHDOG_USEC`): pings every second, a task stale after
/// two without a check-in. Long enough for a debug build on a loaded two-core machine.
const WATCHDOG: Duration = Duration::from_secs(2);

/// The fake systemd end.
struct Notify {
    socket: UnixDatagram,
}

impl Notify {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("binding the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        Notify { socket }
    }

    /// Every message that arrives within `d`, one entry per line (`READY=1`, `WATCHDOG=1`, …).
    fn collect(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                got.extend(text.lines().map(str::to_owned));
            }
        }
        got
    }

    /// Waits up to `d` for `line`; returns what came before it, or `None`.
    fn wait_for(&self, line: &str, d: Duration) -> Option<Vec<String>> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.socket.recv(&mut buf) {
                for l in String::from_utf8_lossy(&buf[..n]).lines() {
                    if l == line {
                        return Some(got);
                    }
                    got.push(l.to_owned());
                }
            }
        }
        None
    }
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| *l == what).count()
}

fn gateway_config(broker: &str, dir: &Path) -> String {
    format!(
        "gateway_id = \"gw-notify\"\n\
         [mqtt]\nbroker = \"{broker}\"\nkeep_alive_s = 5\n\
         [journal]\ndir = {journal:?}\n\
         [[bindings]]\ndevice = \"sim-meter-1\"\npatient = \"p-0001\"\n\
         [[simulated]]\nkind = \"glucometer\"\nid = \"sim-meter-1\"\nstored = 5\nmeasure_every_s = 2\nconnect_every_s = 2\n",
        journal = dir.join("journal").display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_then_watchdog_pings_that_stop_when_a_task_is_wedged_then_stopping_on_sigterm() {
    let broker = TestBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let wedge = dir.path().join("wedge");
    let notify = Notify::bind(&notify_path);
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, gateway_config(&broker.url(), dir.path())).unwrap();
    let usec = WATCHDOG.as_micros().to_string();
    let gw = GatewayProcess::spawn_exe_with_env(
        &gateway_bin(),
        &["run".as_ref(), "--config".as_ref(), config_path.as_os_str()],
        &[
            ("NOTIFY_SOCKET", notify_path.as_os_str()),
            ("WATCHDOG_USEC", usec.as_ref()),
            ("PHG_TEST_WEDGE_FILE", wedge.as_os_str()),
        ],
    )
    .unwrap();

    let before = notify.wait_for("READY=1", Duration::from_secs(60));
    assert!(
        before.is_some(),
        "no READY=1 within 60 s; stderr:\n{}",
        gw.stderr().text()
    );
    assert_eq!(
        before.as_deref().map(|b| count(b, "WATCHDOG=1")),
        Some(0),
        "a watchdog ping before READY=1"
    );

    // Healthy: a ping every WATCHDOG / 2 (1 s); 6 s brings about 6.
    let healthy = notify.collect(Duration::from_secs(6));
    let pings = count(&healthy, "WATCHDOG=1");
    assert!(
        pings >= 4,
        "{pings} watchdog pings in 6 s while healthy (expected about 6): {healthy:?}\nstderr:\n{}",
        gw.stderr().text()
    );

    // Wedge the uplink: its check-ins are ignored from now on. Within WATCHDOG it is stale and the pings
    // stop; after that, not one more.
    std::fs::write(&wedge, "uplink\n").unwrap();
    let _settling = notify.collect(WATCHDOG + Duration::from_millis(1500));
    let wedged = notify.collect(Duration::from_secs(5));
    assert_eq!(
        count(&wedged, "WATCHDOG=1"),
        0,
        "watchdog pings went on with the uplink wedged: {wedged:?}"
    );
    let stale = gw
        .stderr()
        .find("withholding the watchdog ping", 0)
        .expect("the gateway says why it withholds the pings");
    assert!(stale.contains("uplink"), "{stale}");

    // `gateway status` sees it too (the same registry).
    let status = std::process::Command::new(gateway_bin())
        .args(["status", "--json", "-c"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(1),
        "status while wedged: {status:?}"
    );
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["healthy"], false);
    assert_eq!(report["stale_tasks"], serde_json::json!(["uplink"]));

    // Unwedged, the pings come back.
    std::fs::remove_file(&wedge).unwrap();
    let back = notify.collect(Duration::from_secs(4));
    assert!(
        count(&back, "WATCHDOG=1") >= 1,
        "no ping after the uplink checked in again: {back:?}"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    let exit = gw.terminate(Duration::from_secs(30)).await.unwrap();
    let after = notify.collect(Duration::from_millis(500));
    assert!(
        count(&after, "STOPPING=1") == 1,
        "no STOPPING=1 after SIGTERM: {after:?}"
    );
    assert!(
        exit.status.success(),
        "exit after SIGTERM: {:?}",
        exit.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_says_ready_and_stopping() {
    let broker = TestBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = Notify::bind(&notify_path);
    let config_path = dir.path().join("ingest.toml");
    std::fs::write(
        &config_path,
        format!(
            "data_dir = {data:?}\n[mqtt]\nbroker = \"{}\"\n",
            broker.url(),
            data = dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let usec = WATCHDOG.as_micros().to_string();
    let ingest = GatewayProcess::spawn_exe_with_env(
        &ingest_bin(),
        &["run".as_ref(), "--config".as_ref(), config_path.as_os_str()],
        &[
            ("NOTIFY_SOCKET", notify_path.as_os_str()),
            ("WATCHDOG_USEC", usec.as_ref()),
        ],
    )
    .unwrap();
    assert!(
        notify
            .wait_for("READY=1", Duration::from_secs(60))
            .is_some(),
        "ingest: no READY=1; stderr:\n{}",
        ingest.stderr().text()
    );
    let pings = notify.collect(Duration::from_secs(3));
    assert!(count(&pings, "WATCHDOG=1") >= 2, "ingest pings: {pings:?}");
    let exit = ingest.terminate(Duration::from_secs(30)).await.unwrap();
    let after = notify.collect(Duration::from_millis(500));
    assert_eq!(
        count(&after, "STOPPING=1"),
        1,
        "ingest after SIGTERM: {after:?}"
    );
    assert!(exit.status.success(), "{:?}", exit.stderr);
}
