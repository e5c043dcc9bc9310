//! Telemetry: tracing logs (text or JSON) and a Prometheus endpoint.
//!
//! Privacy (DESIGN.md promise 8): logs at info level carry ids, topics and counts, never reading values;
//! values appear at debug level at most.
//!
//! Metrics (all `phg_`): `journal_depth` (gauge), `journal_fsyncs_total`, `readings_accepted_total`, `readings_rejected_total`,
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
///
/// `GET /metrics` is served by the kiosk's axum (HTTP/1.1), not by the exporter's own listener: that one
/// brings a second server stack with HTTP/2 (hyper-util `server-auto`, h2: about 0.5 MB of the Raspberry
/// Pi binary, docs/raspberry-pi.md) for a scrape endpoint that needs neither.
pub fn spawn_exporter(
    config: &Config,
    journal: Arc<Mutex<Journal>>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let addr = config.raw.telemetry.metrics_listen?;
    let listener = match std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, %addr, "metrics endpoint not started; the gateway runs on without it");
            return None;
        }
    };
    let handle = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, %addr, "metrics endpoint not started; the gateway runs on without it");
            return None;
        }
    };
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render.render();
            async move {
                (
                    // The Prometheus text exposition format.
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    let serve_stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(serve_stop.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    describe_metrics();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // Without the exporter's own listener, its housekeeping (histogram windows) is ours to run.
            handle.run_upkeep();
            let (depth, fsyncs) = {
                let j = journal.lock().unwrap_or_else(|p| p.into_inner());
                (j.depth(), j.fsyncs())
            };
            metrics::gauge!("phg_journal_depth").set(depth as f64);
            metrics::counter!("phg_journal_fsyncs_total").absolute(fsyncs);
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

/// The exporter's own metrics, described for the Prometheus endpoint (its `# HELP` lines); the uplink and
/// the card reader describe theirs where they emit them.
fn describe_metrics() {
    metrics::describe_gauge!(
        "phg_journal_depth",
        "Records in the journal not yet acknowledged by the broker."
    );
    metrics::describe_counter!(
        "phg_journal_fsyncs_total",
        "fdatasync calls on the journal's active segment (one per group commit, plus ack syncs): SD card wear."
    );
    metrics::describe_counter!(
        "phg_readings_accepted_total",
        "Readings validated and journaled."
    );
    metrics::describe_counter!(
        "phg_readings_rejected_total",
        "Readings refused by validation (recorded as events)."
    );
    metrics::describe_counter!(
        "phg_readings_unattributed_total",
        "Readings no binding or kiosk session could give a patient (held or sent as events)."
    );
    metrics::describe_counter!(
        "phg_journal_refused_total",
        "Records the journal could not take (full, or a disk error)."
    );
    metrics::describe_gauge!(
        "phg_device_battery_percent",
        "Battery level of each Bluetooth device as last read (0..=100), by device address."
    );
    metrics::describe_counter!(
        "phg_ble_dependency_panics_total",
        "Panics inside bluez-async contained by the gateway (sources::ble::upstream)."
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The names a source file passes to `<macro>!("…"` (whitespace between allowed).
    fn names_after(text: &str, macro_name: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (at, _) in text.match_indices(macro_name) {
            // `counter!(` must not be the tail of `describe_counter!(` when looking for emitted ones.
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = text[at + macro_name.len()..].trim_start();
            if let Some(literal) = rest.strip_prefix('"')
                && let Some(end) = literal.find('"')
            {
                names.insert(literal[..end].to_string());
            }
        }
        names
    }

    fn sources(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("the crate's src directory is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(std::fs::read_to_string(&path).expect("a source file is readable"));
            }
        }
    }

    /// Every metric the gateway emits has a `# HELP` description, so an operator reading /metrics (or a
    /// dashboard built from it) is told what each one counts. Scans the sources, so a metric added
    /// without a description fails here.
    #[test]
    fn every_metric_the_gateway_emits_is_described() {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let (mut emitted, mut described) = (BTreeSet::new(), BTreeSet::new());
        for text in &files {
            for kind in ["counter", "gauge", "histogram"] {
                emitted.extend(names_after(text, &format!("{kind}!(")));
                described.extend(names_after(text, &format!("describe_{kind}!(")));
            }
        }
        assert!(
            emitted.len() >= 15,
            "the scan found the gateway's metrics: {emitted:?}"
        );
        let undescribed: Vec<_> = emitted.difference(&described).collect();
        assert!(
            undescribed.is_empty(),
            "metrics without a description: {undescribed:?}"
        );
    }
}
