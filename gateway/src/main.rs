//! The `gateway` command line: `run`, `demo`, `decode`. Each subcommand reports its own error on stderr
//! (`error: …`) and exits non-zero; nothing is started when the configuration is bad.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Home-monitoring health gateway: Bluetooth glucometers and blood-pressure cuffs to MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway from a TOML configuration (see gateway/config.example.toml).
    Run {
        /// The configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Everything on one machine: an embedded broker, simulated devices, the real pipeline and journal in
    /// a temporary directory, and a viewer printing each delivered reading.
    Demo {
        /// Stop after this many seconds and print a summary (default: until Ctrl-C).
        #[arg(long = "for", value_name = "SECONDS")]
        for_seconds: Option<u64>,
        /// Do not print each delivered message.
        #[arg(long)]
        quiet: bool,
    },
    /// Decode one characteristic value, as captured with nRF Connect or btmon, and print it as JSON.
    ///
    /// CHAR is the 16-bit UUID in hex (2A18 glucose, 2A34 glucose context, 2A51 glucose feature, 2A52 RACP,
    /// 2A35 blood pressure, 2A36 cuff pressure, 2A49 BP feature, 2A08 date time, 2A2B current time,
    /// 2A19 battery, 2A23 system id, 2A24-2A29 device information) or `sfloat` / `float`.
    /// HEX is the value as transmitted: hex digits, case-insensitive; spaces, colons and dashes are ignored.
    Decode {
        /// Characteristic: a 16-bit UUID such as 2A35, or sfloat / float.
        #[arg(value_name = "CHAR")]
        characteristic: String,
        /// The value as transmitted, in hex.
        #[arg(value_name = "HEX", allow_hyphen_values = true, default_value = "")]
        hex: String,
    },
}

/// Cancels `token` on Ctrl-C / SIGTERM, or after `limit`.
fn stop_on_signal(token: CancellationToken, limit: Option<Duration>) {
    tokio::spawn(async move {
        let term = async {
            #[cfg(unix)]
            if let Ok(mut s) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                s.recv().await;
                return;
            }
            std::future::pending::<()>().await;
        };
        let timer = async {
            match limit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
            _ = timer => {}
        }
        token.cancel();
    });
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), String> = match cli.command {
        Command::Decode {
            characteristic,
            hex,
        } => match gateway::decode::decode(&characteristic, &hex) {
            Ok(json) => {
                println!("{json}");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Command::Run { config: path } => (|| {
            let config = gateway::config::Config::load(&path).map_err(|e| e.to_string())?;
            gateway::telemetry::init_logs(config.raw.telemetry.json_logs, "info");
            runtime()?.block_on(async {
                let stop = CancellationToken::new();
                stop_on_signal(stop.clone(), None);
                let s = gateway::app::run(config, stop).await.map_err(|e| match e {
                    // Settings the file holds: named with the file, as the parser's errors are.
                    gateway::app::RunError::Uplink(_) => format!("{}: {e}", path.display()),
                    e => e.to_string(),
                })?;
                tracing::info!(
                    accepted = s.accepted,
                    alerts = s.alerts,
                    delivered = s.delivered,
                    pending = s.journal_depth,
                    "stopped"
                );
                Ok(())
            })
        })(),
        Command::Demo { for_seconds, quiet } => (|| {
            // The demo's output is the viewer's lines; logs only for what goes wrong.
            // The embedded broker logs every disconnect as an error; in the demo that is noise.
            gateway::telemetry::init_logs(false, "warn,rumqttd=off");
            runtime()?.block_on(async {
                let stop = CancellationToken::new();
                stop_on_signal(stop.clone(), for_seconds.map(Duration::from_secs));
                let s = gateway::demo::run(stop, quiet).await.map_err(|e| e.to_string())?;
                println!(
                    "summary: accepted {} readings, delivered {} messages, rejected {}, unattributed {}, \
                     {} still in the journal; the viewer saw {} readings and {} events",
                    s.run.accepted,
                    s.run.delivered,
                    s.run.rejected,
                    s.run.unattributed,
                    s.run.journal_depth,
                    s.readings_seen,
                    s.events_seen
                );
                Ok(())
            })
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
