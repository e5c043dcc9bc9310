//! The `gateway` command line. `anyhow`-free: each subcommand reports its own error and exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Home-monitoring health gateway: Bluetooth glucometers and blood-pressure cuffs to MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Decode {
            characteristic,
            hex,
        } => match gateway::decode::decode(&characteristic, &hex) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
