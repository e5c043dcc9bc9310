//! The `gateway` binary as a user runs it: a child process with a configuration file, its stderr
//! captured line by line, stopped with SIGTERM (graceful) or SIGKILL (a crash / power cut).

use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The `gateway` binary of this build, built first so that it is never stale.
///
/// `CARGO_BIN_EXE_gateway` exists only for the gateway package's own tests, so the binary is found next to
/// this test executable (`target/<profile>/deps/…` → `target/<profile>/gateway`). When the test runs under
/// Cargo (`$CARGO` is set), `cargo build -p gateway --bin gateway` runs once per test process with the same
/// profile and target directory (a no-op when the binary is up to date): `cargo test -p phg-tests` builds
/// the gateway *library* only, and an old binary would test old code. `PHG_GATEWAY_BIN` overrides all this.
///
/// # Panics
///
/// When the binary cannot be built or found (the message says why): nothing can be tested without it.
pub fn gateway_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| package_bin("gateway", "PHG_GATEWAY_BIN"))
        .clone()
}

/// The `Environment=` settings of the packaged gateway service (`packaging/gateway/phg-gateway.service`):
/// what the gateway runs with on a Pi, so what its benchmarks measure it with.
pub fn service_environment() -> Vec<(String, String)> {
    let unit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/gateway/phg-gateway.service");
    std::fs::read_to_string(&unit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The `ingest` binary of this build, found and built as [`gateway_bin`] does (`PHG_INGEST_BIN`
/// overrides).
///
/// # Panics
///
/// As [`gateway_bin`].
pub fn ingest_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| package_bin("ingest", "PHG_INGEST_BIN"))
        .clone()
}

/// The binary `package` (named as its package) next to this test executable, built first; `env`
/// overrides.
fn package_bin(package: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_owned();
    let bin = profile_dir.join(format!("{package}{}", std::env::consts::EXE_SUFFIX));
    if let (Some(mut cmd), Some(target_dir)) = (cargo_build(), profile_dir.parent()) {
        cmd.args(["--quiet", "-p", package, "--bin", package, "--target-dir"])
            .arg(target_dir);
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("running cargo build for the binary");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {package} failed: {status}"
        );
    }
    assert!(bin.is_file(), "no {package} binary at {}", bin.display());
    bin
}

/// `cargo build`, as the Cargo running this test (`$CARGO`) would run it, or `None` outside Cargo.
///
/// What Cargo sets for *this* test run must not leak into the build: a build script that tracks e.g.
/// CARGO_MANIFEST_DIR (ring's does) would see it change, and the nested build and the next `cargo test`
/// would each rebuild the TLS stack for the other.
pub fn cargo_build() -> Option<Command> {
    let cargo = std::env::var_os("CARGO").or_else(|| option_env!("CARGO").map(Into::into))?;
    let mut cmd = Command::new(cargo);
    cmd.arg("build");
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(&key);
        }
    }
    Some(cmd)
}

/// Captured output of a child, line by line, with ANSI colour codes removed (the gateway colours its
/// text logs even when stderr is not a terminal).
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn spawn_reader(&self, from: impl Read + Send + 'static) -> JoinHandle<()> {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                lines.push(strip_ansi(&line));
            }
        })
    }

    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The number of lines so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing was captured yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lines so far, joined (for an assertion message).
    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// The first line (at index `from` or later) containing `needle`.
    pub fn find(&self, needle: &str, from: usize) -> Option<String> {
        self.all()
            .into_iter()
            .skip(from)
            .find(|l| l.contains(needle))
    }

    /// Waits until a line (at index `from` or later) contains `needle`; `None` after `timeout`.
    pub async fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.find(needle, from) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=value` in a text log line (`tracing`'s default format), if present.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// How a [`GatewayProcess`] ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The exit status.
    pub status: ExitStatus,
    /// Everything it wrote on stderr.
    pub stderr: Vec<String>,
    /// Everything it wrote on stdout.
    pub stdout: Vec<String>,
}

/// A running `gateway`. Killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Option<Child>,
    stderr: Lines,
    stdout: Lines,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl GatewayProcess {
    /// Writes `config` to `config_path` and starts `gateway run --config config_path`.
    ///
    /// # Errors
    ///
    /// The file cannot be written or the process not started.
    pub fn run(config_path: &Path, config: &str) -> io::Result<Self> {
        std::fs::write(config_path, config)?;
        Self::spawn(&["run".as_ref(), "--config".as_ref(), config_path.as_os_str()])
    }

    /// Starts `gateway ARGS…`.
    ///
    /// # Errors
    ///
    /// The process could not be started.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> io::Result<Self> {
        Self::spawn_exe(&gateway_bin(), args)
    }

    /// Starts `exe ARGS…` (another of the workspace's programs, e.g. [`ingest_bin`]), watched the same way.
    ///
    /// # Errors
    ///
    /// The process could not be started.
    pub fn spawn_exe<S: AsRef<std::ffi::OsStr>>(exe: &Path, args: &[S]) -> io::Result<Self> {
        Self::spawn_exe_with_env(exe, args, &[])
    }

    /// [`spawn_exe`](Self::spawn_exe) with extra environment variables for the child (e.g. systemd's
    /// `NOTIFY_SOCKET`).
    ///
    /// # Errors
    ///
    /// The process could not be started.
    pub fn spawn_exe_with_env<S: AsRef<std::ffi::OsStr>>(
        exe: &Path,
        args: &[S],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> io::Result<Self> {
        let mut child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = Lines::default();
        let stdout = Lines::default();
        let mut readers = Vec::new();
        if let Some(e) = child.stderr.take() {
            readers.push(stderr.spawn_reader(e));
        }
        if let Some(o) = child.stdout.take() {
            readers.push(stdout.spawn_reader(o));
        }
        Ok(Self {
            child: Some(child),
            stderr,
            stdout,
            readers,
            started: Instant::now(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its stderr so far (a handle that keeps filling while it runs).
    pub fn stderr(&self) -> &Lines {
        &self.stderr
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> &Lines {
        &self.stdout
    }

    /// CPU time it has used so far, user and system (`utime + stime` of `/proc/PID/stat`).
    ///
    /// # Errors
    ///
    /// It is not running, or `/proc` could not be read or parsed.
    pub fn cpu_time(&self) -> io::Result<Duration> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("the gateway process was already stopped"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // After the command name (in parentheses, which may hold spaces): field 3 (state) onwards;
        // utime and stime are fields 14 and 15, in clock ticks (proc(5)).
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| io::Error::other("unexpected /proc/PID/stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> io::Result<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| io::Error::other("unexpected /proc/PID/stat"))
        };
        let total = ticks(11)? + ticks(12)?;
        let per_second = clock_ticks_per_second()?;
        Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
    }

    /// How long since it was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether it is still running.
    ///
    /// # Errors
    ///
    /// The OS could not tell.
    pub fn is_running(&mut self) -> io::Result<bool> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// `kill -9`: no shutdown of any kind (a crash, a power cut as far as this process is concerned).
    ///
    /// # Errors
    ///
    /// The OS refused, or it had already been reaped.
    pub fn kill9(mut self) -> io::Result<Exit> {
        let mut child = self.take_child()?;
        child.kill()?; // SIGKILL
        let status = child.wait()?;
        Ok(self.finish(status))
    }

    /// SIGTERM (what systemd sends on `systemctl stop`) and waits up to `timeout` for it to exit; then
    /// SIGKILL and an error saying it did not stop.
    ///
    /// # Errors
    ///
    /// The signal could not be sent, or it did not exit in time.
    pub async fn terminate(mut self, timeout: Duration) -> io::Result<Exit> {
        let mut child = self.take_child()?;
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| io::Error::other("bad pid"))?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        match wait_timeout(&mut child, timeout).await? {
            Some(status) => Ok(self.finish(status)),
            None => {
                child.kill()?;
                child.wait()?;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "gateway did not exit within {timeout:?} of SIGTERM; its stderr:\n{}",
                        self.stderr.text()
                    ),
                ))
            }
        }
    }

    /// Waits up to `timeout` for it to exit by itself (then SIGKILL and an error).
    ///
    /// # Errors
    ///
    /// It did not exit in time.
    pub async fn wait(mut self, timeout: Duration) -> io::Result<Exit> {
        let mut child = self.take_child()?;
        match wait_timeout(&mut child, timeout).await? {
            Some(status) => Ok(self.finish(status)),
            None => {
                child.kill()?;
                child.wait()?;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "gateway did not exit within {timeout:?}; its stderr:\n{}",
                        self.stderr.text()
                    ),
                ))
            }
        }
    }

    fn take_child(&mut self) -> io::Result<Child> {
        self.child
            .take()
            .ok_or_else(|| io::Error::other("the gateway process was already stopped"))
    }

    fn finish(&mut self, status: ExitStatus) -> Exit {
        // The pipes close with the process: the readers end and every line is in.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Exit {
            status,
            stderr: self.stderr.all(),
            stdout: self.stdout.all(),
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `sysconf(_SC_CLK_TCK)`, as `getconf CLK_TCK` reports it (the unit of `/proc/PID/stat`'s times).
fn clock_ticks_per_second() -> io::Result<u64> {
    static TICKS: OnceLock<u64> = OnceLock::new();
    if let Some(t) = TICKS.get() {
        return Ok(*t);
    }
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    let t: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| io::Error::other("getconf CLK_TCK did not print a number"))?;
    Ok(*TICKS.get_or_init(|| t))
}
