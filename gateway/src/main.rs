//! The `gateway` command line: `run`, `check`, `status`, `demo`, `decode`, `pair`, `devices`. Each subcommand reports its own
//! error on stderr (`error: …`, one line) and exits non-zero: 2 for a configuration that cannot be used
//! (nothing is started), 1 for anything else — the habits `ingest` has too (`check`, `-c/--config`).

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
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a configuration without starting anything (no journal, no connection) and print what it
    /// resolves to; exit 2 with one `error:` line naming the file and key when it cannot be used.
    Check {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Ask the running gateway how it is: broker link, journal backlog, devices, configuration version,
    /// open edge-alert episodes. Exit 0 healthy, 1 unhealthy, 2 unusable configuration, 3 not running,
    /// 4 not allowed to ask (run as root or as a member of group phg).
    Status {
        /// The configuration file the gateway runs with (it names the status socket).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print the report as JSON (one line, for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Everything on one machine: an embedded broker, simulated devices, the real pipeline and journal in
    /// a temporary directory, and a viewer printing each delivered reading (builds with the default
    /// feature `embedded-broker`; the packaged gateway has no embedded broker).
    Demo {
        /// Stop after this many seconds and print a summary (default: until Ctrl-C).
        #[arg(long = "for", value_name = "SECONDS")]
        for_seconds: Option<u64>,
        /// Do not print each delivered message.
        #[arg(long)]
        quiet: bool,
    },
    /// Pair a glucometer or cuff through BlueZ and add it to the allow-list with its patient binding.
    ///
    /// Scans for devices advertising the Glucose or Blood Pressure service, lists them with name and
    /// RSSI, pairs the chosen one (`--address`, or the number typed at the prompt) with BlueZ's
    /// Device1.Pair — a meter that shows a PIN asks for it here (or give `--passkey`) — marks it trusted,
    /// reads its Device Information and stores it. Only devices paired this way are ever connected.
    Pair {
        /// The BLE state directory (`[ble] state_dir` of the configuration).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// The adapter (name such as hci0, or address); default the first.
        #[arg(long)]
        adapter: Option<String>,
        /// Scan this long before listing, seconds.
        #[arg(long, default_value_t = 10, value_name = "SECONDS")]
        scan_s: u64,
        /// Pair this device instead of asking.
        #[arg(long, value_name = "ADDRESS")]
        address: Option<String>,
        /// The pseudonymous patient id every reading of the device goes to.
        #[arg(long)]
        patient: Option<String>,
        /// A cuff user's patient: `--user 2=p-0002` (repeatable).
        #[arg(long = "user", value_name = "ID=PATIENT")]
        users: Vec<String>,
        /// The passkey the device shows (otherwise asked for on the terminal when the device wants one).
        #[arg(long)]
        passkey: Option<u32>,
    },
    /// List the paired devices with their bindings and last session outcome; unpair or rebind one.
    Devices {
        /// The BLE state directory (`[ble] state_dir` of the configuration).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// The adapter, for unpair (default hci0).
        #[arg(long, default_value = "hci0")]
        adapter: String,
        #[command(subcommand)]
        action: Option<DevicesAction>,
    },
    /// Clinic kiosk tools.
    Kiosk {
        #[command(subcommand)]
        action: KioskAction,
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

#[derive(Debug, Subcommand)]
enum KioskAction {
    /// Print a card's hash, HMAC-SHA256(card key, UID), as the CRM's configuration lists it (`cards`).
    /// The UID is not stored or printed; give the key by file so it stays out of the shell history.
    CardHash {
        /// The card key file (`[kiosk] card_key_file`): its first line, hex.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// The card's UID in hex (4, 7 or 10 bytes), as the reader reports it.
        #[arg(long, value_name = "HEX")]
        uid: String,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesAction {
    /// List (the default).
    List,
    /// Remove from the allow-list and make BlueZ forget the bond.
    Unpair {
        /// The device address.
        address: String,
    },
    /// Bind the device (or one cuff user) to another patient.
    Rebind {
        /// The device address.
        address: String,
        /// The pseudonymous patient id.
        #[arg(long)]
        patient: String,
        /// Only this cuff user.
        #[arg(long)]
        user: Option<u8>,
    },
}

fn check_patient(p: &str) -> Result<(), String> {
    if protocol::wire::is_valid_pseudonym(p) {
        Ok(())
    } else {
        // The value is not repeated: it may be a name (it goes to the terminal, and from there to logs).
        Err("the patient id is not a pseudonymous id (letters, digits and '._:-', with at least one letter and \
             one digit; no names or national id numbers)"
            .to_owned())
    }
}

#[allow(clippy::too_many_arguments)]
async fn pair(
    state_dir: PathBuf,
    adapter: Option<String>,
    scan_s: u64,
    address: Option<String>,
    patient: Option<String>,
    users: Vec<String>,
    passkey: Option<u32>,
) -> Result<(), String> {
    use gateway::sources::ble::{self, commands, store::DeviceStore};
    use std::io::{BufRead, Write};
    if let Some(p) = &patient {
        check_patient(p)?;
    }
    let mut user_map = std::collections::BTreeMap::new();
    for u in &users {
        let (id, p) = u
            .split_once('=')
            .ok_or_else(|| format!("--user {u:?}: expected ID=PATIENT"))?;
        let id: u8 = id
            .parse()
            .map_err(|_| format!("--user {u:?}: the user id is a number 1-254"))?;
        check_patient(p)?;
        user_map.insert(id, p.to_owned());
    }
    let cfg = ble::BleConfig::new(state_dir.clone());
    let store = DeviceStore::new(state_dir);
    let manager = btleplug::platform::Manager::new()
        .await
        .map_err(|e| ble::BleError::Bus(e.to_string()).to_string())?;
    let selected = ble::select_adapter(&manager, adapter.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    // BlueZ pairs only devices it has seen: scan first, even when the address is given.
    eprintln!("scanning {scan_s} s on {} …", selected.name);
    let found = commands::scan_candidates(&selected, &store, Duration::from_secs(scan_s))
        .await
        .map_err(|e| e.to_string())?;
    let address = match address {
        Some(a) => a,
        None => {
            if found.is_empty() {
                return Err(
                    "no glucometer or cuff in range (put the device in pairing mode and try again)"
                        .into(),
                );
            }
            for (i, c) in found.iter().enumerate() {
                println!(
                    "{:>2}  {}  {:<10}  {:<24}  {:>4} dBm{}",
                    i + 1,
                    c.address,
                    format!("{:?}", c.kind).to_lowercase(),
                    c.name.as_deref().unwrap_or("(no name)"),
                    c.rssi.map_or("?".into(), |r| r.to_string()),
                    if c.paired_here { "  (paired here)" } else { "" }
                );
            }
            print!("pair which one? [1-{}] ", found.len());
            let _ = std::io::stdout().flush();
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let n: usize = line.trim().parse().map_err(|_| "not a number".to_owned())?;
            found
                .get(n.wrapping_sub(1))
                .ok_or_else(|| "no such device".to_owned())?
                .address
                .clone()
        }
    };
    let provider: gateway::sources::ble::pairing::PasskeyProvider = match passkey {
        Some(p) => std::sync::Arc::new(move |_: &str| Some(p)),
        None => std::sync::Arc::new(|_: &str| {
            eprint!("enter the passkey the device shows: ");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).ok()?;
            line.trim().parse().ok()
        }),
    };
    let req = commands::PairRequest {
        address,
        patient,
        users: user_map,
    };
    let d = commands::pair_and_store(&cfg, &selected, &store, &req, Some(provider))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "paired {} ({}, model {}), bound to {}",
        d.address,
        format!("{:?}", d.kind).to_lowercase(),
        d.model.as_deref().unwrap_or("unknown"),
        describe_binding(&d)
    );
    Ok(())
}

fn describe_binding(d: &gateway::sources::ble::store::PairedDevice) -> String {
    let mut parts: Vec<String> = d.patient.iter().cloned().collect();
    parts.extend(d.users.iter().map(|(u, p)| format!("user {u} → {p}")));
    if parts.is_empty() {
        "nobody (readings are held as unattributed)".into()
    } else {
        parts.join(", ")
    }
}

async fn devices(
    state_dir: PathBuf,
    adapter: String,
    action: Option<DevicesAction>,
) -> Result<(), String> {
    use gateway::sources::ble::{commands, store::DeviceStore};
    let store = DeviceStore::new(state_dir);
    match action.unwrap_or(DevicesAction::List) {
        DevicesAction::List => {
            let devices = store.devices().map_err(|e| e.to_string())?;
            let statuses = store.statuses().unwrap_or_default();
            if devices.is_empty() {
                println!("no paired devices (pair one with `gateway pair`)");
            }
            for d in devices.values() {
                let st = statuses.get(&d.address).cloned().unwrap_or_default();
                let last = match (&st.last_failure, st.last_success) {
                    (Some(f), _) => format!(
                        "last failure: {} — {} (RSSI {})",
                        f.stage,
                        f.cause,
                        f.rssi.map_or("?".into(), |r| format!("{r} dBm"))
                    ),
                    (None, Some(_)) => "last session complete".into(),
                    (None, None) => "no session yet".into(),
                };
                let battery = st.battery.map_or(String::new(), |b| {
                    let low = if b.is_low() { " (low)" } else { "" };
                    format!("  |  battery {} %{low}", b.percent)
                });
                println!(
                    "{}  {:<10}  {:<16}  {}  |  {}{}",
                    d.address,
                    format!("{:?}", d.kind).to_lowercase(),
                    d.model.as_deref().unwrap_or("?"),
                    describe_binding(d),
                    last,
                    battery
                );
            }
            Ok(())
        }
        DevicesAction::Unpair { address } => {
            let bluez = commands::unpair(&adapter, &store, &address)
                .await
                .map_err(|e| e.to_string())?;
            match bluez {
                None => println!("unpaired {address}"),
                Some(e) => println!(
                    "removed {address} from the allow-list; BlueZ did not forget the bond: {e}"
                ),
            }
            Ok(())
        }
        DevicesAction::Rebind {
            address,
            patient,
            user,
        } => {
            check_patient(&patient)?;
            store
                .rebind(&address, user, &patient)
                .map_err(|e| e.to_string())?;
            println!(
                "rebound {address} to {patient} (a running gateway picks it up at its next start)"
            );
            Ok(())
        }
    }
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

/// Loads and checks a configuration as `run` does before starting anything: the file, then the uplink
/// settings it describes (TLS files read, plaintext to a remote host refused). Errors name the file.
fn load_checked(path: &std::path::Path) -> Result<gateway::config::Config, String> {
    let config = gateway::config::Config::load(path).map_err(|e| e.to_string())?;
    let topics = gateway::app::topics(&config);
    gateway::app::uplink_config(&config, &topics)
        .and_then(|u| u.validate().map_err(gateway::app::RunError::from))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

/// `gateway check`: the one-line summary of a usable configuration.
fn summary(c: &gateway::config::Config) -> String {
    let raw = &c.raw;
    format!(
        "ok: gateway {}, broker {} (MQTT {:?}), journal {}, {} bindings, {} simulated devices, ble {}, alerts {}, \
         max_packet_bytes {}, max_config_bytes {}, CRM configuration kept in {}",
        raw.gateway_id,
        raw.mqtt.broker,
        c.mqtt_version,
        raw.journal.dir.display(),
        raw.bindings.len(),
        raw.simulated.len(),
        if raw.ble.is_some() { "on" } else { "off" },
        if c.alert_rules.is_some() { "on" } else { "off" },
        raw.mqtt.max_packet_bytes,
        raw.mqtt.max_config_bytes,
        raw.journal.crm_config_file().display(),
    ) + &kiosk_summary(c)
}

/// `gateway check`'s words for `[kiosk]` (never its secrets).
fn kiosk_summary(c: &gateway::config::Config) -> String {
    match (&c.raw.kiosk, &c.kiosk) {
        (Some(k), Some(checked)) => format!(
            ", kiosk on {} ({} devices, idle timeout {} s, {} staff tokens, card reader {}, held readings in {})",
            k.listen,
            k.devices.len(),
            k.idle_timeout_s,
            checked.staff.len(),
            k.reader
                .as_ref()
                .map_or_else(|| "off".to_owned(), |r| r.display().to_string()),
            k.hold_file(&c.raw.journal.dir).display(),
        ),
        _ => ", kiosk off".to_owned(),
    }
}

/// Exit status 2: the configuration cannot be used (as `ingest`).
const EXIT_CONFIG: u8 = 2;

/// `gateway status`: exit 0 healthy, 1 unhealthy, 2 configuration unusable, 3 not running, 4 denied.
fn status(path: &std::path::Path, json: bool) -> ExitCode {
    let config = match gateway::config::Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let socket = config.raw.status.socket_path(&config.raw.journal.dir);
    match gateway::status::ask(&socket) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{}", report.render());
            }
            if report.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                gateway::status::AskError::NotRunning(_) => 3,
                gateway::status::AskError::Denied(_) => 4,
                gateway::status::AskError::Failed { .. } => 1,
            })
        }
    }
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
        Command::Kiosk {
            action: KioskAction::CardHash { key_file, uid },
        } => (|| {
            let text = std::fs::read_to_string(&key_file)
                .map_err(|e| format!("{}: {e}", key_file.display()))?;
            let key =
                gateway::kiosk::card::CardKey::from_hex(text.lines().next().unwrap_or_default())
                    .map_err(|e| format!("{}: {e}", key_file.display()))?;
            let uid = gateway::kiosk::card::uid_from_hex(&uid).map_err(|e| e.to_string())?;
            println!("{}", key.hash(&uid));
            Ok(())
        })(),
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
        Command::Pair {
            state_dir,
            adapter,
            scan_s,
            address,
            patient,
            users,
            passkey,
        } => (|| {
            gateway::telemetry::init_logs(false, "warn");
            runtime()?.block_on(pair(
                state_dir, adapter, scan_s, address, patient, users, passkey,
            ))
        })(),
        Command::Devices {
            state_dir,
            adapter,
            action,
        } => (|| {
            gateway::telemetry::init_logs(false, "warn");
            runtime()?.block_on(devices(state_dir, adapter, action))
        })(),
        Command::Status { config: path, json } => return status(&path, json),
        Command::Check { config: path } => match load_checked(&path) {
            Ok(c) => {
                println!("{}", summary(&c));
                Ok(())
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Command::Run { config: path } => match (|| {
            let config = match gateway::config::Config::load(&path) {
                Ok(c) => c,
                Err(e) => return Err((EXIT_CONFIG, e.to_string())),
            };
            gateway::telemetry::init_logs(config.raw.telemetry.json_logs, "info");
            runtime().map_err(|e| (1, e))?.block_on(async {
                let stop = CancellationToken::new();
                stop_on_signal(stop.clone(), None);
                let s = gateway::app::run(config, stop).await.map_err(|e| match e {
                    // Settings the file holds: named with the file, as the parser's errors are.
                    gateway::app::RunError::Uplink(_) | gateway::app::RunError::Journal(_) => {
                        (EXIT_CONFIG, format!("{}: {e}", path.display()))
                    }
                    e => (1, e.to_string()),
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
        })() {
            Ok(()) => Ok(()),
            Err((code, e)) => {
                eprintln!("error: {e}");
                return ExitCode::from(code);
            }
        },
        #[cfg(not(feature = "embedded-broker"))]
        Command::Demo { .. } => Err(
            "this gateway was built without the embedded broker (cargo feature `embedded-broker`; \
                 the packages leave it out): `gateway demo` needs it — run `cargo run --release -p \
                 gateway -- demo` from the sources, or `gateway run` against your broker"
                .to_owned(),
        ),
        #[cfg(feature = "embedded-broker")]
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
