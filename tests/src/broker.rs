//! A real MQTT broker per test: Mosquitto when it is installed, else the gateway's embedded rumqttd.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::broker::EmbeddedBroker;

/// Which broker a [`TestBroker`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// A `mosquitto` child process (stoppable and restartable on the same port).
    Mosquitto,
    /// The embedded rumqttd (MQTT 3.1.1 listener; cannot be stopped: rumqttd has no shutdown).
    Rumqttd,
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "embedded rumqttd",
        })
    }
}

/// A broker on a free loopback port, private to one test. Killed on drop (Mosquitto).
#[derive(Debug)]
pub struct TestBroker {
    kind: BrokerKind,
    addr: SocketAddr,
    mosquitto: Option<Mosquitto>,
    _embedded: Option<EmbeddedBroker>,
}

#[derive(Debug)]
struct Mosquitto {
    exe: PathBuf,
    /// Config, log and persistence store; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Where `mosquitto` is: on `PATH`, or in the sbin directories a Debian package puts it (often not on a
/// normal user's `PATH`). `PHG_TEST_BROKER=rumqttd` pretends it is not installed (to run the suite the way
/// a machine without Mosquitto does).
pub fn mosquitto_path() -> Option<PathBuf> {
    if std::env::var("PHG_TEST_BROKER").is_ok_and(|v| v == "rumqttd") {
        return None;
    }
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"].map(PathBuf::from))
        .find(|p| p.is_file())
}

impl TestBroker {
    /// Mosquitto if installed, else the embedded rumqttd; says which on stderr (so a test log shows it).
    ///
    /// # Errors
    ///
    /// The broker did not come up.
    pub fn start() -> io::Result<Self> {
        match Self::start_mosquitto() {
            Some(b) => b,
            None => {
                eprintln!("test broker: mosquitto not found; using the embedded rumqttd");
                Self::start_embedded()
            }
        }
    }

    /// Mosquitto, or `None` if it is not installed.
    pub fn start_mosquitto() -> Option<io::Result<Self>> {
        Self::start_mosquitto_with("")
    }

    /// Mosquitto with extra configuration lines (e.g. an `acl_file`), or `None` if not installed.
    pub fn start_mosquitto_with(extra_config: &str) -> Option<io::Result<Self>> {
        let exe = mosquitto_path()?;
        Some(Self::spawn_mosquitto(exe, extra_config))
    }

    fn spawn_mosquitto(exe: PathBuf, extra_config: &str) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("phg-mosquitto-")
            .tempdir()?;
        let addr = free_loopback_port()?;
        // persistence: a clean stop (SIGTERM) saves the store, so a persistent subscriber's queue
        // survives `stop`/`restart` and the tests can tell the broker's losses from ours.
        // max_queued_messages 0: no limit (the default 1000 drops QoS 1 to a slow subscriber).
        // user root: only matters when the tests run as root (Mosquitto would otherwise switch to the
        // `mosquitto` user, which cannot write this private temp directory).
        let config = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {store}/\n\
             max_queued_messages 0\n\
             user root\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             {extra_config}\n",
            port = addr.port(),
            store = dir.path().display(),
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config)?;
        let mut m = Mosquitto {
            exe,
            dir,
            child: None,
        };
        m.spawn(addr)?;
        eprintln!("test broker: mosquitto on {addr}");
        Ok(Self {
            kind: BrokerKind::Mosquitto,
            addr,
            mosquitto: Some(m),
            _embedded: None,
        })
    }

    /// The embedded rumqttd (MQTT 3.1.1), whatever is installed.
    ///
    /// # Errors
    ///
    /// It did not come up.
    pub fn start_embedded() -> io::Result<Self> {
        let b = EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(io::Error::other)?;
        let addr = b
            .v4_addr()
            .ok_or_else(|| io::Error::other("embedded broker has no v4 listener"))?;
        eprintln!("test broker: embedded rumqttd on {addr}");
        Ok(Self {
            kind: BrokerKind::Rumqttd,
            addr,
            mosquitto: None,
            _embedded: Some(b),
        })
    }

    /// Which broker this is.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// The MQTT version to speak to it: the gateway's default (5) to Mosquitto, 3.1.1 to the embedded
    /// rumqttd (its MQTT 5 support is partial; its 3.1.1 listener is what it offers).
    pub fn mqtt_version(&self) -> gateway::uplink::MqttVersion {
        match self.kind {
            BrokerKind::Mosquitto => gateway::uplink::MqttVersion::V5,
            BrokerKind::Rumqttd => gateway::uplink::MqttVersion::V311,
        }
    }

    /// [`mqtt_version`](Self::mqtt_version) as the configuration file spells it (`[mqtt] version`).
    pub fn mqtt_version_setting(&self) -> &'static str {
        match self.mqtt_version() {
            gateway::uplink::MqttVersion::V5 => "5",
            gateway::uplink::MqttVersion::V311 => "3.1.1",
        }
    }

    /// Its listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Mosquitto process's id (`None` for the embedded rumqttd, or while stopped): for a bench that
    /// reads its CPU time.
    pub fn pid(&self) -> Option<u32> {
        self.mosquitto
            .as_ref()
            .and_then(|m| m.child.as_ref())
            .map(Child::id)
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// Mosquitto's log so far (errors, warnings, notices), for a failing test's message; empty for
    /// rumqttd (it logs through `tracing`).
    pub fn log(&self) -> String {
        self.mosquitto
            .as_ref()
            .map(|m| read_log(&m.dir.path().join("mosquitto.log")))
            .unwrap_or_default()
    }

    /// Whether [`stop`](Self::stop) / [`restart`](Self::restart) work (Mosquitto only).
    pub fn can_restart(&self) -> bool {
        self.mosquitto.is_some()
    }

    /// Stops the broker cleanly (SIGTERM: Mosquitto closes every connection and saves its store).
    ///
    /// # Errors
    ///
    /// `Unsupported` for rumqttd; an OS error otherwise.
    pub fn stop(&mut self) -> io::Result<()> {
        self.mosquitto_mut()?.stop(true)
    }

    /// Kills the broker (SIGKILL: nothing saved, connections reset).
    ///
    /// # Errors
    ///
    /// As [`stop`](Self::stop).
    pub fn kill(&mut self) -> io::Result<()> {
        self.mosquitto_mut()?.stop(false)
    }

    /// Starts the broker again on the same port (after [`stop`](Self::stop) or [`kill`](Self::kill)).
    ///
    /// # Errors
    ///
    /// `Unsupported` for rumqttd; the broker did not come up.
    pub fn restart(&mut self) -> io::Result<()> {
        let addr = self.addr;
        let m = self.mosquitto_mut()?;
        m.stop(true)?;
        m.spawn(addr)
    }

    fn mosquitto_mut(&mut self) -> io::Result<&mut Mosquitto> {
        self.mosquitto.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the embedded rumqttd cannot be stopped or restarted (it has no shutdown)",
            )
        })
    }
}

impl Mosquitto {
    fn spawn(&mut self, addr: SocketAddr) -> io::Result<()> {
        // stderr to a file we open (Mosquitto may switch users; the file descriptor still works).
        let log_path = self.dir.path().join("mosquitto.log");
        let log = File::options().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.exe)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(io::Error::other(format!(
                    "mosquitto exited ({status}) at start; its log:\n{}",
                    read_log(&log_path)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(io::Error::other(format!(
            "mosquitto did not listen on {addr} within 10 s; its log:\n{}",
            read_log(&log_path)
        )))
    }

    fn stop(&mut self, graceful: bool) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if graceful {
            let pid = i32::try_from(child.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .ok_or_else(|| io::Error::other("bad pid"))?;
            rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A free port on 127.0.0.1 (bound and released; the broker binds it right after).
pub fn free_loopback_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}
