//! A throw-away PostgreSQL server for tests and benches: `initdb` into a temporary directory, started on
//! a free loopback port with its Unix socket in that directory, stopped (immediate mode) on drop.
//!
//! The binaries are looked for in `$PG_BIN`, on `PATH`, and in `/usr/lib/postgresql/*/bin` (Debian's
//! `postgresql` package, the newest version first). When none is found, [`TempPostgres::start`] returns
//! `Ok(None)` and the caller skips with [`SKIP_MESSAGE`]. PostgreSQL refuses to run as root: as root, the
//! server runs as the `postgres` user (or `nobody`) through `runuser`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a test prints when PostgreSQL is absent.
pub const SKIP_MESSAGE: &str = "skipped: PostgreSQL not installed (CI installs it)";

/// A running temporary PostgreSQL server.
#[derive(Debug)]
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    port: u16,
    /// The server's options (`pg_ctl -o`), kept for [`TempPostgres::start_again`].
    opts: String,
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() && dir.join("postgres").is_file()
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`, if any.
pub fn postgres_bin() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PG_BIN").map(PathBuf::from)
        && has_initdb(&d)
    {
        return Some(d);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_initdb(&d) {
                return Some(d);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    // The effective uid of this process, from procfs (no libc call needed).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn uid_gid(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TempPostgres {
    /// Starts a server; `Ok(None)` when PostgreSQL is not installed. `fsync` off is for tests (faster,
    /// nothing to keep); benches measure with it on.
    ///
    /// # Errors
    /// When the binaries are there but the server cannot be initialised or started (the message has the
    /// server's log).
    pub fn start(fsync: bool) -> std::io::Result<Option<TempPostgres>> {
        TempPostgres::start_with(fsync, None)
    }

    /// [`TempPostgres::start`] with TLS on (`ssl = on`) and this certificate chain and private key (PEM);
    /// plaintext clients are still accepted, so a test can tell which one it got (`pg_stat_ssl`).
    ///
    /// # Errors
    /// As [`TempPostgres::start`].
    pub fn start_with_tls(
        fsync: bool,
        cert_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<Option<TempPostgres>> {
        TempPostgres::start_with(fsync, Some((cert_pem, key_pem)))
    }

    fn start_with(fsync: bool, tls: Option<(&str, &str)>) -> std::io::Result<Option<TempPostgres>> {
        let Some(bin) = postgres_bin() else {
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("ingest-pg-").tempdir()?;
        let run_as = if is_root() {
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|u| uid_gid(u).is_some())
                .ok_or_else(|| {
                    std::io::Error::other("running as root and no postgres/nobody user")
                })?;
            let (uid, gid) = uid_gid(user).ok_or_else(|| std::io::Error::other("passwd"))?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            Some(user.to_owned())
        } else {
            None
        };
        let mut pg = TempPostgres {
            dir,
            bin,
            run_as,
            port: 0,
            opts: String::new(),
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut ssl = String::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt as _;
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, pem)?;
                // PostgreSQL refuses a key that others can read; the server's user must own it.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                if let Some(user) = &pg.run_as {
                    let (uid, gid) =
                        uid_gid(user).ok_or_else(|| std::io::Error::other("passwd"))?;
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
            ssl = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into();
        }
        // A port picked now may be taken by the time the server binds: retry a few times.
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=50{ssl}",
                pg.port,
                pg.dir.path().display(),
                if fsync { "on" } else { "off" }
            );
            pg.opts = opts;
            match pg.start_again() {
                Ok(()) => return Ok(Some(pg)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("pg_ctl start failed")))
    }

    /// Stops the server the way a crash or a power cut does (`pg_ctl stop -m immediate`: no checkpoint,
    /// every client cut off); [`TempPostgres::start_again`] brings it back on the same port with the same
    /// data, recovering from its WAL.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn crash(&self) -> std::io::Result<()> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
    }

    /// Starts the server (again, after [`TempPostgres::crash`]) on its port.
    ///
    /// # Errors
    /// When `pg_ctl` fails (the message has the server's log).
    pub fn start_again(&self) -> std::io::Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &self.opts, "-w", "-t", "30", "start",
            ],
        )
    }

    /// The server's data directory (`pg_ctl -D`).
    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::io::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            Err(std::io::Error::other(format!(
                "{tool} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db` (see [`Self::create_database`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (each test its own, on one server).
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn create_database(&self, name: &str) -> Result<String, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        drop(client);
        let _ = task.await;
        Ok(self.url(name))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // Nothing to keep: the crash's immediate stop is the quickest.
        let _ = self.crash();
    }
}

/// The gateway id in the test messages: publish them on `phg/v1/gw-test/readings` (ingest refuses a
/// reading whose gateway is not its topic's).
pub const TEST_GATEWAY: &str = "gw-test";

/// The reading id a test names `name`: a version 5 UUID (the form every reading id has, and the only one
/// ingest accepts), derived from the name; a name that already is a UUID is kept.
pub fn reading_uuid(name: &str) -> String {
    if uuid::Uuid::try_parse(name).is_ok() {
        return name.to_owned();
    }
    uuid::Uuid::new_v5(&protocol::reading_id::NAMESPACE, name.as_bytes()).to_string()
}

/// A `phg.reading/1` glucose message (valid, trusted time, mg/dL) as the gateway publishes it, with id
/// [`reading_uuid`]`(id)`.
pub fn glucose_message(id: &str, patient: &str, mg_dl: u32, time_utc: i64) -> String {
    let t = protocol::wire::rfc3339_utc(time_utc).unwrap_or_default();
    serde_json::json!({
        "schema": "phg.reading/1",
        "id": reading_uuid(id),
        "gateway": TEST_GATEWAY,
        "patient": patient,
        "device": { "id": "meter-test" },
        "kind": "glucose",
        "sequence_number": 1,
        "glucose": {
            "value": mg_dl, "unit": "mg/dL", "mg_per_dl": mg_dl,
            "mmol_per_l": f64::from(mg_dl) / 18.016
        },
        "context": { "meal": "preprandial" },
        "time": { "received": t, "corrected": t, "clock_offset_s": 0, "trusted": true },
        "status": { "flags": [] },
        "quality": "valid"
    })
    .to_string()
}

/// A `phg.reading/1` blood-pressure message (valid, mmHg, trusted time), with id [`reading_uuid`]`(id)`.
pub fn bp_message(
    id: &str,
    patient: &str,
    sys: u32,
    dia: u32,
    pulse: u32,
    time_utc: i64,
) -> String {
    let t = protocol::wire::rfc3339_utc(time_utc).unwrap_or_default();
    serde_json::json!({
        "schema": "phg.reading/1",
        "id": reading_uuid(id),
        "gateway": TEST_GATEWAY,
        "patient": patient,
        "device": { "id": "cuff-test", "user_id": 1 },
        "kind": "blood_pressure",
        "blood_pressure": {
            "unit": "mmHg", "systolic": sys, "diastolic": dia,
            "systolic_mmhg": sys, "diastolic_mmhg": dia, "pulse_bpm": pulse
        },
        "time": { "received": t, "corrected": t, "clock_offset_s": 0, "trusted": true },
        "status": { "flags": [] },
        "quality": "valid"
    })
    .to_string()
}

/// A `phg.symptoms/1` report as the gateway publishes it (built by `protocol::wire`): `patient`'s answer
/// `symptoms` to the question of the reading [`reading_uuid`]`(reading)`, at `answered_utc`.
///
/// # Panics
/// When `patient` is not a pseudonym or the time is out of range (a test's mistake).
pub fn symptoms_message(
    reading: &str,
    patient: &str,
    symptoms: &[protocol::rules::Symptom],
    answered_utc: i64,
) -> String {
    let m = protocol::wire::SymptomsMessage::new(
        TEST_GATEWAY,
        patient,
        &reading_uuid(reading),
        protocol::rules::Symptoms::of(symptoms),
        answered_utc,
    )
    .expect("a valid test report");
    serde_json::to_string(&m).expect("a report serialises")
}

/// The rule ids of `patient`'s alerts (up to 50), as the API lists them.
///
/// # Errors
/// The store's.
pub async fn alert_rules_of(
    store: &crate::store::AnyStore,
    patient: &str,
) -> Result<Vec<String>, crate::store::StoreError> {
    use crate::store::Store;
    Ok(store
        .alerts_of(patient, 50)
        .await?
        .into_iter()
        .map(|a| a.rule_id)
        .collect())
}
