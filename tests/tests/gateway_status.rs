//! `gateway status` as an operator (or a monitoring script) runs it against the real `gateway` binary, a
//! real Mosquitto and a simulated glucometer: "not running" before the start (its own exit status), healthy
//! while readings flow, unhealthy once the broker has been down past `[status] broker_down_s` with
//! readings waiting in the journal, healthy again after the broker is back, and never a patient id in
//! the report.

// A test binary: a failed set-up step is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use phg_tests::TestBroker;
use phg_tests::process::{GatewayProcess, gateway_bin};
use serde_json::Value;

/// Short, so the test is quick: unhealthy 3 s after the broker went away (with readings waiting).
const BROKER_DOWN_S: u64 = 3;

const PATIENT: &str = "p-7f3a-0042";

fn config(broker: &str, dir: &Path, metrics: std::net::SocketAddr) -> String {
    format!(
        "gateway_id = \"gw-status\"\n\
         [mqtt]\nbroker = \"{broker}\"\nkeep_alive_s = 5\n\
         [telemetry]\nmetrics_listen = \"{metrics}\"\n\
         [journal]\ndir = {journal:?}\n\
         [status]\nbroker_down_s = {BROKER_DOWN_S}\n\
         [[bindings]]\ndevice = \"sim-meter-1\"\npatient = \"{PATIENT}\"\n\
         [[simulated]]\nkind = \"glucometer\"\nid = \"sim-meter-1\"\nstored = 3\nmeasure_every_s = 1\nconnect_every_s = 1\n",
        journal = dir.join("journal").display().to_string(),
    )
}

/// `gateway status -c CONFIG [--json]`: exit code and stdout.
fn status(config: &Path, json: bool) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(gateway_bin());
    cmd.arg("status").arg("-c").arg(config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Polls `status --json` until `pred` holds on (exit code, report); the last pair on time-out.
fn wait_status(
    config: &Path,
    within: Duration,
    pred: impl Fn(Option<i32>, &Value) -> bool,
) -> Result<(Option<i32>, Value), (Option<i32>, String)> {
    let end = Instant::now() + within;
    loop {
        let (code, out) = status(config, true);
        let report: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if pred(code, &report) {
            return Ok((code, report));
        }
        if Instant::now() > end {
            return Err((code, out));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_broker_and_the_journal() {
    let Some(broker) = TestBroker::start_mosquitto() else {
        eprintln!("skipped: the test stops and restarts the broker, which needs Mosquitto");
        return;
    };
    let mut broker = broker.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    // A free loopback port for the Prometheus endpoint (released before the gateway binds it).
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &config_path,
        config(&broker.url(), dir.path(), metrics_addr),
    )
    .unwrap();

    // Not running: its own exit status, and a sentence saying so.
    let (code, out) = status(&config_path, false);
    assert_eq!(code, Some(3), "status before the start: {out}");

    let gw = GatewayProcess::spawn(&["run".as_ref(), "--config".as_ref(), config_path.as_os_str()])
        .unwrap();

    // Healthy, connected, readings PUBACKed, the device's session complete.
    let (_, healthy) = wait_status(&config_path, Duration::from_secs(60), |code, r| {
        code == Some(0)
            && r["broker"]["connected"] == true
            && r["broker"]["last_puback"].is_string()
            && r["devices"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["id"] == "sim-meter-1" && d["outcome"] == "complete")
            })
    })
    .unwrap_or_else(|(code, out)| {
        panic!(
            "never healthy: exit {code:?}, {out}\nstderr:\n{}",
            gw.stderr().text()
        )
    });
    assert_eq!(healthy["healthy"], true);
    assert_eq!(healthy["schema"], "phg.gateway-status/1");
    assert!(healthy["alerts"]["open_episodes"].is_object(), "{healthy}");
    assert_eq!(healthy["stale_tasks"], serde_json::json!([]));

    // The Prometheus endpoint, as a scraper reads it: the counters, the journal depth, and no patient id.
    // The pipeline's counters are copied into the exporter once a second: poll until they show.
    let accepted_of = |scrape: &str| {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix("phg_readings_accepted_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let end = Instant::now() + Duration::from_secs(10);
    let mut scrape = scrape_metrics(metrics_addr);
    while !accepted_of(&scrape).is_some_and(|n| n > 0.0) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(300));
        scrape = scrape_metrics(metrics_addr);
    }
    assert!(
        scrape.starts_with("HTTP/1.1 200") && scrape.contains("text/plain; version=0.0.4"),
        "{scrape}"
    );
    assert!(accepted_of(&scrape).is_some_and(|n| n > 0.0), "{scrape}");
    assert!(scrape.contains("\nphg_journal_depth "), "{scrape}");
    assert!(
        scrape.contains("# HELP phg_readings_accepted_total"),
        "{scrape}"
    );
    assert!(!scrape.contains(PATIENT), "a patient id in the metrics");

    // The socket: group phg may ask (0660), nobody else.
    let socket = dir.path().join("gateway.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "status socket mode {mode:o}");

    // For a person.
    let (code, text) = status(&config_path, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("healthy") && text.contains("broker:   connected"),
        "{text}"
    );

    // The broker goes away; the meter keeps measuring, so the journal grows. Unhealthy once the broker
    // has been down BROKER_DOWN_S with readings waiting — not before the threshold.
    let stopped = Instant::now();
    broker.stop().unwrap();
    let (code, down) = wait_status(&config_path, Duration::from_secs(60), |code, _| {
        code == Some(1)
    })
    .unwrap_or_else(|(code, out)| panic!("never unhealthy: exit {code:?}, {out}"));
    assert!(
        stopped.elapsed() >= Duration::from_secs(BROKER_DOWN_S),
        "unhealthy {:?} after the broker stopped, before the {BROKER_DOWN_S} s threshold",
        stopped.elapsed()
    );
    assert_eq!(code, Some(1));
    assert_eq!(down["healthy"], false);
    assert_eq!(down["broker"]["connected"], false);
    assert!(down["journal"]["depth"].as_u64().unwrap_or(0) > 0, "{down}");
    assert!(down["journal"]["oldest_waiting_s"].is_u64(), "{down}");
    let problems = down["problems"].to_string();
    assert!(problems.contains("broker"), "{problems}");
    let (_, text) = status(&config_path, false);
    assert!(
        text.contains("UNHEALTHY") && text.contains("not connected"),
        "{text}"
    );

    // No patient data in either form.
    let (_, json) = status(&config_path, true);
    assert!(
        !json.contains(PATIENT) && !text.contains(PATIENT),
        "{json}\n{text}"
    );

    // The broker is back: healthy again once the backlog is delivered.
    broker.restart().unwrap();
    wait_status(&config_path, Duration::from_secs(90), |code, r| {
        code == Some(0) && r["broker"]["connected"] == true
    })
    .unwrap_or_else(|(code, out)| panic!("never healthy again: exit {code:?}, {out}"));

    // Stopped: "not running" again, and the socket is gone.
    let exit = gw.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(exit.status.success(), "{:?}", exit.stderr);
    let (code, _) = status(&config_path, false);
    assert_eq!(code, Some(3));
    assert!(!socket.exists());
}

/// `GET /metrics` over plain HTTP/1.1, as Prometheus scrapes it: the whole response.
fn scrape_metrics(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}
