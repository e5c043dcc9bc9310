//! Telemetry: tracing logs (text or JSON) and a Prometheus endpoint.
//!
//! Privacy (DESIGN.md promise 8): logs at info level carry ids, topics and counts, never reading values;
//! values appear at debug level at most.
//!
//! Metrics (all `phg_`): `journal_depth` (gauge), `readings_accepted_total`, `readings_rejected_total`,
//! `readings_unattributed_total`, `journal_refused_total` (counters, from the pipeline), and from the uplink
//! `readings_delivered_total`, `mqtt_reconnects_total`, `publish_latency_seconds`, `inflight`; and
//! `ble_dependency_panics_total`, panics inside bluez-async contained by `sources::ble::upstream`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::Config;
use crate::journal::Journal;
use crate::pipeline::Counters;

/// Installs the log subscriber: `RUST_LOG` filters (default `default_filter`), JSON lines when `json`.
///
/// `RUST_LOG` takes `target=level` directives and a default level (`info,gateway::uplink=debug`):
/// tracing-subscriber's `Targets`, which is `EnvFilter`'s syntax without span and field filters — and
/// without the regular-expression engine `EnvFilter` brings into the binary (issue 14 item 5). A value
/// that does not parse is ignored (the default applies), as before.
pub fn init_logs(json: bool, default_filter: &str) {
    let parse = |s: &str| s.parse::<Targets>().ok();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| parse(&s))
        .or_else(|| parse(default_filter))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // Colour only on a terminal: under systemd, journald would store the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests, demo after run) is harmless: the first subscriber stays.
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
}

/// Starts the Prometheus endpoint when the config asks for one, and a task that copies the pipeline's
/// counters and the journal depth into it once a second.
pub fn spawn_exporter(
    config: &Config,
    journal: Arc<Mutex<Journal>>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let addr = config.raw.telemetry.metrics_listen?;
    if let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
    {
        tracing::warn!(error = %e, %addr, "metrics endpoint not started; the gateway runs on without it");
        return None;
    }
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let depth = journal.lock().unwrap_or_else(|p| p.into_inner()).depth();
            metrics::gauge!("phg_journal_depth").set(depth as f64);
            for (name, c) in [
                ("phg_readings_accepted_total", &counters.accepted),
                ("phg_readings_rejected_total", &counters.rejected),
                ("phg_readings_unattributed_total", &counters.unattributed),
                ("phg_journal_refused_total", &counters.refused),
            ] {
                metrics::counter!(name).absolute(c.load(Ordering::Relaxed));
            }
            metrics::counter!("phg_ble_dependency_panics_total")
                .absolute(crate::sources::ble::upstream::contained_panics());
        }
    }))
}
