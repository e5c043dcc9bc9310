//! `gateway demo`: the whole gateway on one machine, with nothing installed.
//!
//! An embedded broker (rumqttd, MQTT 3.1.1) on a loopback port, a simulated home patient (a glucometer and
//! a cuff), a clinic kiosk with a shared cuff and meter — its pages served on a loopback port, simulated
//! patients checking in by card and at the staff desk, one who forgets to check in (held unattributed) and
//! one with a crisis-range reading (see a nurse) — the real pipeline and journal in a temporary directory,
//! and a subscriber that prints each delivered message as a readable line. The configuration goes through
//! the same parser as `gateway run`.

use std::path::Path;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::app::{self, RunSummary};
use crate::broker::EmbeddedBroker;
use crate::config::Config;
use crate::config::{SimKind, SimulatedSection};
use crate::kiosk::{Kiosk, KioskControl, PatientScreen, StaffId};
use crate::sources::simulator::SimDevice;

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

/// The demo's clinic kiosk devices (driven by [`clinic`], not by a timer).
const CLINIC_CUFF: &str = "sim-clinic-cuff";
const CLINIC_METER: &str = "sim-clinic-meter";
/// The demo's staff token id.
const DEMO_DESK: &str = "demo-desk";
/// The demo's clinic cards (UIDs as a reader reports them) and their patients.
const CARDS: [([u8; 7], &str); 2] = [
    ([0x04, 0x5A, 0x3C, 0x21, 0x7F, 0x61, 0x80], "p-clinic-0042"),
    ([0x04, 0x11, 0x9E, 0x52, 0x3A, 0x61, 0x81], "p-clinic-0044"),
];

fn random_hex(bytes: usize) -> String {
    let b: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    protocol::wire::to_hex(&b)
}

fn demo_config(broker: &str, journal: &Path, card_key: &str, token: &str) -> String {
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

# The clinic kiosk: a shared cuff and meter; readings go to whoever is checked in when they are measured.
[kiosk]
listen = "127.0.0.1:0"
devices = ["{CLINIC_CUFF}", "{CLINIC_METER}"]
card_key = "{card_key}"

[[kiosk.staff]]
id = "{DEMO_DESK}"
token = "{token}"

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

"#,
        journal = journal.display()
    )
}

/// The clinic's devices: measured by [`clinic`]'s patients, read every 2 s like a kiosk's devices.
fn clinic_devices() -> Result<Vec<(SimulatedSection, SimDevice)>, DemoError> {
    let section = |kind, id: &str| SimulatedSection {
        kind,
        id: id.to_owned(),
        // Yesterday's readings in the shared devices' memories: replayed on connect, held, never guessed.
        stored: 2,
        measure_every_s: 0,
        connect_every_s: 2,
        clock_offset_s: 0,
        unit: Some("mmol/L".to_owned()),
        users: vec![1],
    };
    let now = crate::sources::simulator::unix_now();
    let cuff = section(SimKind::Cuff, CLINIC_CUFF);
    let meter = section(SimKind::Glucometer, CLINIC_METER);
    Ok(vec![
        (cuff.clone(), app::simulated_device(&cuff, now - 86_400, 7)?),
        (
            meter.clone(),
            app::simulated_device(&meter, now - 86_400, 8)?,
        ),
    ])
}

/// One clinic day, again and again: the simulated patients at the kiosk.
async fn clinic(kiosk: Arc<Kiosk>, devices: Vec<SimDevice>, stop: CancellationToken, quiet: bool) {
    let say = |line: &str| {
        if !quiet {
            println!("kiosk    {line}");
        }
    };
    let [cuff, meter] = [devices.first().cloned(), devices.get(1).cloned()];
    let (Some(cuff), Some(meter)) = (cuff, meter) else {
        return;
    };
    let staff = StaffId(DEMO_DESK.to_owned());
    let pause = |s: u64| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = stop.cancelled() => false,
                () = tokio::time::sleep(Duration::from_secs(s)) => true,
            }
        }
    };
    let now = crate::sources::simulator::unix_now;
    let measure_bp = |sys: u16, dia: u16| {
        let _ = cuff.with_cuff(|c| c.measure(1, sys, dia, 72, Default::default(), now()));
    };
    let mut round: u16 = 0;
    loop {
        round = round.wrapping_add(1);
        let jitter = round % 7;
        // 1. A card tap, a blood pressure in range, "done".
        if !pause(2).await {
            return;
        }
        say("card tapped: checked in");
        kiosk.card_presented(&CARDS[0].0, now());
        if !pause(2).await {
            return;
        }
        measure_bp(124 + jitter, 79);
        if !pause(7).await {
            return;
        }
        let _ = kiosk.check_out(None).await;
        say("patient pressed done");
        // 2. Checked in at the staff desk, a glucose reading.
        if !pause(3).await {
            return;
        }
        if kiosk.check_in("p-clinic-0043", &staff).await.is_ok() {
            say("staff checked a patient in");
        }
        if !pause(2).await {
            return;
        }
        let _ =
            meter.with_glucometer(|g| g.add_record(now(), 6.2 + f64::from(jitter) / 10.0, Some(1)));
        if !pause(7).await {
            return;
        }
        let _ = kiosk.check_out(Some(&staff)).await;
        // 3. Someone measures without checking in: held for staff.
        if !pause(3).await {
            return;
        }
        say("a patient measured without checking in: held as unattributed");
        measure_bp(138, 86 + jitter);
        // 4. A crisis-range reading: the page asks about symptoms; "yes" means see a nurse now.
        if !pause(6).await {
            return;
        }
        say("card tapped: checked in");
        kiosk.card_presented(&CARDS[1].0, now());
        if !pause(2).await {
            return;
        }
        measure_bp(192, 118);
        if !pause(6).await {
            return;
        }
        if let PatientScreen::Result {
            session, result, ..
        } = kiosk.screen_now()
            && result.question.is_some()
        {
            say("patient answered yes to the symptom question: see a nurse now");
            let _ = kiosk
                .answer_symptoms(session, &result.reading_id, true)
                .await;
        }
        if !pause(6).await {
            return;
        }
        let _ = kiosk.check_out(None).await;
    }
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
    } else if topic.ends_with("/config") {
        let n = |k: &str| v.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        format!(
            "config   the CRM's {} version {}: {} bindings, {} kiosk cards",
            s("/schema"),
            v.get("version").and_then(Value::as_u64).unwrap_or(0),
            n("bindings"),
            n("cards")
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
    let card_key = random_hex(32);
    let token = random_hex(20);
    let config = Config::parse(
        &demo_config(&broker.url(), &dir.join("journal"), &card_key, &token),
        Path::new("(demo)"),
    )?;
    // The CRM's side of the kiosk: its configuration maps the cards' keyed hashes to patients.
    let key = crate::kiosk::card::CardKey::from_hex(&card_key)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let crm_config = serde_json::json!({
        "schema": protocol::wire::CONFIG_SCHEMA,
        "version": 1,
        "bindings": [
            {"device": "sim-home-meter", "patient": "p-home-0001"},
            {"device": "sim-home-cuff", "patient": "p-home-0001"},
        ],
        "cards": CARDS.iter().map(|(uid, p)| serde_json::json!({"card": key.hash(uid), "patient": p})).collect::<Vec<_>>(),
    })
    .to_string();
    let config_topic = crate::app::topics(&config).config();
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
                        let _ = client
                            .publish(
                                config_topic.clone(),
                                QoS::AtLeastOnce,
                                true,
                                crm_config.clone(),
                            )
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

    let clinic_devices = clinic_devices()?;
    let handles: Vec<SimDevice> = clinic_devices.iter().map(|(_, d)| d.clone()).collect();
    let (kiosk_tx, kiosk_rx) = tokio::sync::oneshot::channel();
    let hooks = app::RunHooks {
        kiosk: Some(kiosk_tx),
        simulated: clinic_devices,
    };
    let clinic_stop = shutdown.clone();
    let clinic_task = tokio::spawn(async move {
        let Ok((kiosk, addr)) = kiosk_rx.await else {
            return;
        };
        println!("kiosk page: http://{addr}/");
        println!("staff page: http://{addr}/staff  (token: {token})");
        clinic(kiosk, handles, clinic_stop, quiet).await;
    });
    let run = app::run_with(config, shutdown, hooks).await;
    clinic_task.abort();
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
