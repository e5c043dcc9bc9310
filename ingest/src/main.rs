//! `ingest`: the CRM-side ingest service.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ingest",
    version,
    about = "Stores gateway readings, evaluates alert rules, delivers alerts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service until SIGINT or SIGTERM.
    Run {
        /// The TOML configuration (every table optional; see the README).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Checks a configuration and prints what it resolves to.
    Check {
        /// The TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn load(path: Option<&PathBuf>) -> Result<ingest::config::Config, String> {
    match path {
        Some(p) => ingest::config::Config::load(p).map_err(|e| e.to_string()),
        None => ingest::config::Config::parse("", std::path::Path::new("(defaults)"))
            .map_err(|e| e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    let (config, check) = match &cli.command {
        Command::Run { config } => (load(config.as_ref()), false),
        Command::Check { config } => (load(Some(config)), true),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!(
            "ok: instance {} (MQTT client id {}), database {}, broker {}:{}, subscriptions {:?}, max message {} bytes, webhook {}, api {:?}, {} patients",
            config.instance,
            config.mqtt.client_id,
            if config.database_url.starts_with("sqlite://") {
                config.database_url.as_str()
            } else {
                "postgres (url not shown)"
            },
            config.mqtt.host,
            config.mqtt.port,
            config.mqtt.filters(),
            config.mqtt.max_message_size,
            config.webhook.as_ref().map_or("none", |w| w.url.as_str()),
            config.api_listen,
            config.patients.len()
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ingest::service::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
