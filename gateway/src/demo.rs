//! `gateway demo`: the whole gateway on one machine, with nothing installed.
//!
//! An embedded broker (rumqttd, MQTT 3.1.1) on a loopback port, a simulated home patient (a glucometer and
//! a cuff), a simulated clinic cuff with two users — one checked in, one not, so unattributed readings show
//! up — the real pipeline and journal in a temporary directory, and a subscriber that prints each delivered
//! message as a readable line. The configuration goes through the same parser as `gateway run`.

use std::path::Path;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::app::{self, RunSummary};
use crate::broker::EmbeddedBroker;
use crate::config::Config;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded broker did not start.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// The demo configuration was refused (a bug: it is built in).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The gateway failed.
    #[error(transparent)]
    Run(#[from] app::RunError),
    /// The temporary directory could not be made.
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
}

/// The demo's summary.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    /// The gateway's own counts.
    pub run: RunSummary,
    /// Readings the subscriber saw.
    pub readings_seen: u64,
    /// Events the subscriber saw.
    pub events_seen: u64,
}

fn demo_config(broker: &str, journal: &Path) -> String {
    format!(
        r#"
gateway_id = "demo"

[mqtt]
broker = "{broker}"
version = "3.1.1"

[journal]
dir = "{journal}"

[[bindings]]
device = "sim-home-meter"
patient = "p-home-0001"

[[bindings]]
device = "sim-home-cuff"
patient = "p-home-0001"

# The clinic cuff: user 1 is checked in; user 2 is nobody's, so their readings wait as unattributed.
[[bindings]]
device = "sim-clinic-cuff"
user_id = 1
patient = "p-clinic-0042"

[[simulated]]
kind = "glucometer"
id = "sim-home-meter"
stored = 12
measure_every_s = 4
connect_every_s = 5

[[simulated]]
kind = "cuff"
id = "sim-home-cuff"
stored = 4
measure_every_s = 6
connect_every_s = 6

[[simulated]]
kind = "cuff"
id = "sim-clinic-cuff"
users = [1, 2]
stored = 6
measure_every_s = 3
connect_every_s = 4
"#,
        journal = journal.display()
    )
}

/// One delivered message as a line a person reads.
pub fn describe(topic: &str, payload: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return format!("{topic}: (not JSON, {} bytes)", payload.len());
    };
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    let f = |p: &str| v.pointer(p).and_then(Value::as_f64);
    if topic.ends_with("/readings") {
        let what = match s("/kind").as_str() {
            "glucose" => match (
                f("/glucose/value"),
                v.pointer("/glucose/censored").and_then(Value::as_str),
            ) {
                (_, Some(c)) => format!("glucose {}", if c == "low" { "LO" } else { "HI" }),
                (Some(x), None) => {
                    let unit = s("/glucose/unit");
                    let other = if unit == "mg/dL" {
                        f("/glucose/mmol_per_l").map(|m| format!(" ({m:.1} mmol/L)"))
                    } else {
                        f("/glucose/mg_per_dl").map(|m| format!(" ({m:.0} mg/dL)"))
                    };
                    format!("glucose {x} {unit}{}", other.unwrap_or_default())
                }
                _ => "glucose ?".into(),
            },
            _ => format!(
                "BP {}/{} {}{}",
                f("/blood_pressure/systolic").unwrap_or(f64::NAN),
                f("/blood_pressure/diastolic").unwrap_or(f64::NAN),
                s("/blood_pressure/unit"),
                f("/blood_pressure/pulse_bpm")
                    .map(|p| format!(", pulse {p}"))
                    .unwrap_or_default()
            ),
        };
        let time = v
            .pointer("/time/corrected")
            .and_then(Value::as_str)
            .map_or_else(|| s("/time/received"), str::to_owned);
        format!(
            "reading  {:<14} {:<16} {what:<40} at {time}  [{}]",
            s("/patient"),
            s("/device/id"),
            s("/quality")
        )
    } else if topic.ends_with("/events") {
        let detail = v
            .pointer("/event/reason")
            .and_then(Value::as_str)
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        format!(
            "event    {:<14} {:<16} {}{detail}",
            "",
            s("/event/device"),
            s("/event/type")
        )
    } else if topic.ends_with("/status") {
        format!("status   gateway {} is {}", s("/gateway"), s("/state"))
    } else if topic.ends_with("/alerts") {
        // `open` carries the alert inline; the other actions under `alert`.
        let alert = v
            .pointer("/update/alert")
            .or_else(|| v.pointer("/update"))
            .unwrap_or(&Value::Null);
        let a = |k: &str| alert.get(k).and_then(Value::as_str).unwrap_or("?");
        format!(
            "alert    {:<14} {:<16} {} {} {} ({})",
            a("patient"),
            a("rule_id"),
            s("/update/action"),
            a("severity"),
            a("status"),
            a("message")
        )
    } else {
        format!("{topic}: {} bytes", payload.len())
    }
}

/// Runs the demo until `shutdown` fires.
///
/// # Errors
/// [`DemoError`] when the broker, the configuration or the gateway fails.
pub async fn run(shutdown: CancellationToken, quiet: bool) -> Result<DemoSummary, DemoError> {
    let broker = EmbeddedBroker::start(
        "127.0.0.1:0"
            .parse()
            .map_err(|_| std::io::Error::other("address"))?,
    )?;
    let dir = std::env::temp_dir().join(format!("phg-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = Config::parse(
        &demo_config(&broker.url(), &dir.join("journal")),
        Path::new("(demo)"),
    )?;
    println!(
        "demo: broker {} (embedded), journal {}",
        broker.url(),
        dir.join("journal").display()
    );
    println!("demo: Ctrl-C to stop");

    // The CRM side: a subscriber that prints what reaches the broker.
    let addr = broker
        .v4_addr()
        .ok_or_else(|| std::io::Error::other("broker has no 3.1.1 listener"))?;
    let mut opts = MqttOptions::new("phg-demo-viewer", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 256);
    let topic_filter = format!("{}/#", crate::app::topics(&config).root());
    let viewer_stop = CancellationToken::new();
    let viewer = {
        let stop = viewer_stop.clone();
        tokio::spawn(async move {
            let (mut readings, mut evs) = (0u64, 0u64);
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = events.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client
                            .subscribe(topic_filter.clone(), QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic.ends_with("/readings") {
                            readings += 1;
                        } else if p.topic.ends_with("/events") {
                            evs += 1;
                        }
                        if !quiet {
                            println!("{}", describe(&p.topic, &p.payload));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            (readings, evs)
        })
    };

    let run = app::run(config, shutdown).await;
    // Let the last deliveries reach the viewer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    viewer_stop.cancel();
    let (readings_seen, events_seen) = viewer.await.unwrap_or((0, 0));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DemoSummary {
        run: run?,
        readings_seen,
        events_seen,
    })
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn the_viewer_names_an_alert_for_people() {
        let payload = br#"{"schema":"phg.alert/1","gateway":"demo","time":"2026-11-23T14:00:00Z",
            "update":{"action":"open","id":"p-1/BP_GRADE2/1","patient":"p-1","rule_id":"BP_GRADE2",
            "severity":"INFO","status":"active","message":"Blood pressure at grade 2"}}"#;
        let line = describe("phg/v1/demo/alerts", payload);
        assert!(line.starts_with("alert    p-1"), "{line}");
        for part in ["BP_GRADE2", "open INFO active", "Blood pressure at grade 2"] {
            assert!(line.contains(part), "{line}");
        }
        let confirm = br#"{"schema":"phg.alert/1","gateway":"demo","time":"2026-11-23T14:00:00Z",
            "update":{"action":"confirm","by":"repeat","alert":{"patient":"p-2","rule_id":"BP_LOW",
            "severity":"ADVISORY","status":"active","message":"Low"}}}"#;
        let line = describe("phg/v1/demo/alerts", confirm);
        assert!(
            line.contains("p-2") && line.contains("confirm ADVISORY"),
            "{line}"
        );
    }
}
