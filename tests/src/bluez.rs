//! A BlueZ-compatible `org.bluez` D-Bus service, written by us, for running the gateway's real btleplug
//! path without a radio (shared/BLUEZ.md).
//!
//! # What it serves
//!
//! On a private `dbus-daemon` ([`system_bus`]), from one zbus connection that owns `org.bluez` (btleplug
//! only listens to signals from that owner):
//!
//! - `/` — `org.freedesktop.DBus.ObjectManager` (`GetManagedObjects`, `InterfacesAdded` / `Removed`);
//! - `/org/bluez` — `AgentManager1`: the gateway registers its `Agent1` here, and `Device1.Pair` calls the
//!   agent's `RequestPasskey` for a device that shows a PIN;
//! - `/org/bluez/hci0` — `Adapter1` with every property btleplug requires (a missing one silently drops
//!   the adapter), discovery with a filter, `RemoveDevice`;
//! - `/org/bluez/hci0/dev_XX_…` — `Device1` (`Connect`, `Disconnect`, `Pair`, the properties btleplug
//!   requires, RSSI updates while discovering, as BlueZ does with `DuplicateData`);
//! - `…/serviceNNNN/charNNNN/descNNNN` — `GattService1` / `GattCharacteristic1` / `GattDescriptor1`, in
//!   BlueZ's naming (btleplug discovers by `Introspect`), for the device's primary service, Device
//!   Information (0x180A), Current Time (0x1805) and Battery (0x180F, [`FakeDevice::battery`]).
//!
//! # Who answers
//!
//! The simulator's device models ([`SimDevice`]): every `ReadValue`, `WriteValue`, `StartNotify` goes to
//! the model, and every output it queues becomes a `PropertiesChanged(Value)` signal on its
//! characteristic (notifications and indications look the same on D-Bus). So the profile rules — ATT
//! 0x81 for a RACP write before the CCCDs, Insufficient Authentication before bonding, a dump on
//! subscribe, a link dropped after N records — are the models', not re-implemented here. ATT errors are
//! turned into D-Bus errors the way bluetoothd's `gatt-client.c` does (`NotPermitted "Not paired"` for
//! authentication/encryption, `Failed "Operation failed with ATT error: 0xNN"` for the rest). Battery
//! Level is the exception: the models have no battery, so the fake answers it from
//! [`FakeDevice::battery`] (still only on a live connection, and seen by the model as a request).
//!
//! Test controls: [`FakeBluez::add_device`], [`FakeBluez::remove_adapter`] / [`FakeBluez::add_adapter`]
//! (the USB dongle pulled and plugged back), and [`FakeBluez::calls`], a log of what the gateway asked.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gateway::sources::simulator::{DeviceOutput, SimDevice, SimModel, unix_now};
use gateway::sources::{LinkError, uuid};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue};
use zbus::{Connection, interface};

/// The adapter's object path.
pub const ADAPTER_PATH: &str = "/org/bluez/hci0";
/// The adapter's address.
pub const ADAPTER_ADDRESS: &str = "00:1A:7D:DA:71:13";
/// The battery level a [`FakeDevice`] reports unless told otherwise.
pub const DEFAULT_BATTERY_PERCENT: u8 = 87;

// -------------------------------------------------------------------------------------------------------
// The private bus
// -------------------------------------------------------------------------------------------------------

/// A `dbus-daemon` of type `system` on a socket in a temporary directory, started once per test binary;
/// it exits when the test binary does (its stdin is the binary's pipe).
#[derive(Debug)]
struct PrivateBus {
    address: String,
    _dir: tempfile::TempDir,
    _guard: Mutex<std::process::ChildStdin>,
}

static BUS: OnceLock<Option<PrivateBus>> = OnceLock::new();

/// Starts the private system bus (once) and points `DBUS_SYSTEM_BUS_ADDRESS` at it, so btleplug (libdbus)
/// and zbus's `Connection::system()` in the code under test connect there. `None` when `dbus-daemon` is
/// not installed (the caller prints "skipped").
///
/// # Panics
/// When `dbus-daemon` exists but does not start: a broken test machine.
pub fn system_bus() -> Option<&'static str> {
    BUS.get_or_init(start_bus)
        .as_ref()
        .map(|b| b.address.as_str())
}

/// `dbus-daemon`: `PHG_DBUS_DAEMON` if set (an unusual install, or a path that does not exist to check
/// the skip), else the Debian locations.
fn dbus_daemon_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("PHG_DBUS_DAEMON") {
        let p = std::path::PathBuf::from(p);
        return p.exists().then_some(p);
    }
    [
        "/usr/bin/dbus-daemon",
        "/bin/dbus-daemon",
        "/usr/local/bin/dbus-daemon",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

fn start_bus() -> Option<PrivateBus> {
    let daemon = dbus_daemon_path()?;
    let dir = tempfile::tempdir().expect("a temporary directory for the bus");
    let socket = dir.path().join("system_bus_socket");
    let config = dir.path().join("system.conf");
    std::fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"#,
            socket.display()
        ),
    )
    .expect("write the bus config");
    // The shell waits on its stdin, which is this process's pipe: when the test binary exits the pipe
    // closes and the daemon is stopped, so no bus outlives its tests. (The shell lives exactly as long as
    // the test binary, so there is nothing to wait for.)
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" --config-file="$1" --nofork --print-address=1 & pid=$!; read _; kill $pid"#)
        .arg(&daemon)
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dbus-daemon");
    let stdout = child.stdout.take().expect("dbus-daemon stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("dbus-daemon prints its address");
    let address = line.trim().to_owned();
    assert!(
        address.starts_with("unix:"),
        "dbus-daemon did not start: {address:?}"
    );
    let mut stdin = child.stdin.take().expect("dbus-daemon stdin");
    let _ = stdin.flush();
    // SAFETY (edition 2024 `set_var`): called once, from the OnceLock initialiser, before any code in this
    // test binary connects to D-Bus; libdbus reads the variable when it first connects. No other thread
    // of this binary writes the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &address);
    }
    Some(PrivateBus {
        address,
        _dir: dir,
        _guard: Mutex::new(stdin),
    })
}

// -------------------------------------------------------------------------------------------------------
// Errors, as bluetoothd sends them
// -------------------------------------------------------------------------------------------------------

/// `org.bluez.Error.*`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bluez.Error")]
pub enum BluezError {
    /// A zbus failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// `org.bluez.Error.Failed`.
    Failed(String),
    /// `org.bluez.Error.NotPermitted`.
    NotPermitted(String),
    /// `org.bluez.Error.NotSupported`.
    NotSupported(String),
    /// `org.bluez.Error.NotReady`.
    NotReady(String),
    /// `org.bluez.Error.InProgress`.
    InProgress(String),
    /// `org.bluez.Error.AlreadyExists`.
    AlreadyExists(String),
    /// `org.bluez.Error.DoesNotExist`.
    DoesNotExist(String),
    /// `org.bluez.Error.AuthenticationFailed`.
    AuthenticationFailed(String),
    /// `org.bluez.Error.AuthenticationRejected`.
    AuthenticationRejected(String),
    /// `org.bluez.Error.AuthenticationCanceled`.
    AuthenticationCanceled(String),
}

/// What bluetoothd answers for a failed GATT operation (`create_gatt_dbus_error` in gatt-client.c).
fn gatt_error(e: LinkError) -> BluezError {
    match e {
        LinkError::Att(0x05 | 0x0C | 0x0F) => BluezError::NotPermitted("Not paired".into()),
        LinkError::Att(0x02) => BluezError::NotPermitted("Read not permitted".into()),
        LinkError::Att(0x03) => BluezError::NotPermitted("Write not permitted".into()),
        LinkError::Att(0x06) => BluezError::NotSupported("Not supported".into()),
        LinkError::Att(code) => {
            BluezError::Failed(format!("Operation failed with ATT error: 0x{code:02x}"))
        }
        LinkError::Missing(_) => BluezError::NotSupported("Not supported".into()),
        LinkError::Disconnected => BluezError::Failed("Not connected".into()),
        LinkError::Timeout => BluezError::Failed("Operation failed".into()),
    }
}

// -------------------------------------------------------------------------------------------------------
// Shared state
// -------------------------------------------------------------------------------------------------------

/// A device the fake adapter can see.
#[derive(Debug, Clone)]
pub struct FakeDevice {
    /// `AA:BB:CC:DD:EE:FF`.
    pub address: String,
    /// The advertised name.
    pub name: String,
    /// The model answering GATT.
    pub device: SimDevice,
    /// The PIN the device shows when pairing (passkey entry); `None` pairs "just works".
    pub passkey: Option<u32>,
    /// The RSSI reported while it advertises.
    pub rssi: i16,
    /// Fault: the first `StartNotify` of each characteristic is answered but ignored (a RACP write then
    /// gets ATT 0x81 from the model).
    pub ignore_first_cccd_writes: bool,
    /// Fault: sequence number → how many more times its Glucose Measurement arrives damaged on the way
    /// (truncated, each time to a different length: 3 + the times left, so no two damaged copies are
    /// alike); after that it comes whole.
    pub garble: BTreeMap<u16, u32>,
    /// Fault: Glucose Measurements damaged in the meter's memory: each time truncated to the same 4
    /// octets (sequence number readable), never whole.
    pub corrupt: std::collections::BTreeSet<u16>,
    /// Fault: the next this many RACP writes are refused with ATT 0x80 (a procedure already in progress,
    /// GLS.TS SPE/BI-07) without reaching the meter.
    pub refuse_racp_writes: u32,
    /// The Battery Level (0x2A19) value as the device sends it, in a Battery Service (0x180F); `None`:
    /// the device has no Battery Service. Raw octets, so a test can send a malformed level. Default: 87 %.
    pub battery: Option<Vec<u8>>,
}

impl FakeDevice {
    /// A device at `address` named `name`, answered by `device`, "just works" pairing, RSSI −60.
    pub fn new(address: &str, name: &str, device: SimDevice) -> Self {
        FakeDevice {
            address: address.to_owned(),
            name: name.to_owned(),
            device,
            passkey: None,
            rssi: -60,
            ignore_first_cccd_writes: false,
            garble: BTreeMap::new(),
            corrupt: std::collections::BTreeSet::new(),
            refuse_racp_writes: 0,
            battery: Some(vec![DEFAULT_BATTERY_PERCENT]),
        }
    }

    /// The Battery Service reports `percent`.
    #[must_use]
    pub fn with_battery_level(mut self, percent: u8) -> Self {
        self.battery = Some(vec![percent]);
        self
    }

    /// No Battery Service at all (many meters have none).
    #[must_use]
    pub fn without_battery(mut self) -> Self {
        self.battery = None;
        self
    }

    /// Pairing needs this passkey (the meter displays it).
    #[must_use]
    pub fn with_passkey(mut self, passkey: u32) -> Self {
        self.passkey = Some(passkey);
        self
    }

    fn path(&self) -> String {
        device_path(&self.address)
    }
}

fn device_path(address: &str) -> String {
    format!("{ADAPTER_PATH}/dev_{}", address.replace(':', "_"))
}

/// One call the gateway made, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The device address, or "adapter" / "agent".
    pub target: String,
    /// The method (`Connect`, `Pair`, `WriteValue 2A52`, `StartDiscovery`, …).
    pub method: String,
    /// When it arrived, for timing rules (a CCCD write too soon after the previous request).
    pub at: Instant,
}

#[derive(Debug)]
struct DeviceEntry {
    fake: FakeDevice,
    /// The model's connection id while connected.
    connection: Option<u64>,
    /// Characteristic UUID → object path.
    chars: BTreeMap<u16, String>,
    paired: bool,
    /// Characteristics whose first CCCD write was ignored (fault injection).
    ignored_cccds: std::collections::BTreeSet<u16>,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<String, DeviceEntry>,
    adapter_present: bool,
    discovering: bool,
    agent: Option<(String, OwnedObjectPath)>,
    /// `RegisterAgent` calls still to leave unanswered ([`FakeBluez::leave_register_agent_unanswered`]).
    unanswered_register_agent: usize,
    calls: Vec<Call>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
}

impl Inner {
    /// A short, await-free critical section (std mutex, never held across `.await`).
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log(&self, target: &str, method: impl Into<String>) {
        self.lock().calls.push(Call {
            target: target.to_owned(),
            method: method.into(),
            at: Instant::now(),
        });
    }
}

// -------------------------------------------------------------------------------------------------------
// Interfaces
// -------------------------------------------------------------------------------------------------------

struct AgentManager {
    inner: Arc<Inner>,
}

#[interface(name = "org.bluez.AgentManager1")]
impl AgentManager {
    async fn register_agent(
        &self,
        agent: ObjectPath<'_>,
        capability: String,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), BluezError> {
        let sender = header
            .sender()
            .map(|s| s.to_string())
            .ok_or_else(|| BluezError::Failed("no sender".into()))?;
        self.inner
            .log("agent", format!("RegisterAgent {capability}"));
        let unanswered = {
            let mut st = self.inner.lock();
            let silent = st.unanswered_register_agent > 0;
            if silent {
                st.unanswered_register_agent -= 1;
            } else {
                st.agent = Some((sender, agent.into()));
            }
            silent
        };
        if unanswered {
            // The caller sees what a reply lost on its side looks like: none, ever.
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn unregister_agent(&self, _agent: ObjectPath<'_>) -> Result<(), BluezError> {
        self.inner.log("agent", "UnregisterAgent");
        self.inner.lock().agent = None;
        Ok(())
    }

    async fn request_default_agent(&self, _agent: ObjectPath<'_>) -> Result<(), BluezError> {
        Ok(())
    }
}

struct Adapter {
    inner: Arc<Inner>,
    powered: bool,
    discovering: bool,
}

#[interface(name = "org.bluez.Adapter1")]
impl Adapter {
    async fn start_discovery(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        self.inner.log("adapter", "StartDiscovery");
        if !self.powered {
            return Err(BluezError::NotReady("Resource Not Ready".into()));
        }
        self.discovering = true;
        self.inner.lock().discovering = true;
        self.discovering_changed(&emitter).await?;
        Ok(())
    }

    async fn stop_discovery(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        self.inner.log("adapter", "StopDiscovery");
        self.discovering = false;
        self.inner.lock().discovering = false;
        self.discovering_changed(&emitter).await?;
        Ok(())
    }

    async fn set_discovery_filter(
        &self,
        filter: std::collections::HashMap<String, OwnedValue>,
    ) -> Result<(), BluezError> {
        let mut keys: Vec<_> = filter.keys().cloned().collect();
        keys.sort();
        let uuids = filter
            .get("UUIDs")
            .and_then(|v| Vec::<String>::try_from(v.try_clone().ok()?).ok())
            .unwrap_or_default();
        self.inner.log(
            "adapter",
            format!("SetDiscoveryFilter {} {}", keys.join(","), uuids.join(",")),
        );
        Ok(())
    }

    async fn get_discovery_filters(&self) -> Vec<String> {
        vec![
            "UUIDs".into(),
            "RSSI".into(),
            "Transport".into(),
            "DuplicateData".into(),
        ]
    }

    async fn remove_device(&self, device: ObjectPath<'_>) -> Result<(), BluezError> {
        let mut st = self.inner.lock();
        let entry = st
            .devices
            .values_mut()
            .find(|d| d.fake.path() == device.as_str())
            .ok_or_else(|| BluezError::DoesNotExist("Does Not Exist".into()))?;
        // The bond is forgotten on our side; the device object stays (it may still advertise).
        entry.paired = false;
        let address = entry.fake.address.clone();
        st.calls.push(Call {
            target: address,
            method: "RemoveDevice".into(),
            at: Instant::now(),
        });
        Ok(())
    }

    #[zbus(property)]
    fn address(&self) -> String {
        ADAPTER_ADDRESS.into()
    }
    #[zbus(property)]
    fn address_type(&self) -> String {
        "public".into()
    }
    #[zbus(property)]
    fn name(&self) -> String {
        "phg-test".into()
    }
    #[zbus(property)]
    fn alias(&self) -> String {
        "phg-test".into()
    }
    #[zbus(property)]
    fn class(&self) -> u32 {
        0
    }
    #[zbus(property)]
    fn modalias(&self) -> String {
        "usb:v1D6Bp0246d0542".into()
    }
    #[zbus(property)]
    fn powered(&self) -> bool {
        self.powered
    }
    #[zbus(property)]
    fn set_powered(&mut self, powered: bool) {
        self.powered = powered;
    }
    #[zbus(property)]
    fn discoverable(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn pairable(&self) -> bool {
        true
    }
    #[zbus(property)]
    fn discovering(&self) -> bool {
        self.discovering
    }
    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `Device1`'s properties live here; the rest in [`Inner`].
struct Device {
    inner: Arc<Inner>,
    conn: Connection,
    address: String,
    name: String,
    service_uuids: Vec<String>,
    rssi: i16,
    connected: bool,
    services_resolved: bool,
    paired: bool,
    trusted: bool,
}

impl Device {
    fn device(&self) -> Option<SimDevice> {
        self.inner
            .lock()
            .devices
            .get(&self.address)
            .map(|d| d.fake.device.clone())
    }
}

#[interface(name = "org.bluez.Device1")]
impl Device {
    async fn connect(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        self.inner.log(&self.address, "Connect");
        let Some(device) = self.device() else {
            return Err(BluezError::Failed("Device gone".into()));
        };
        if !self.inner.lock().adapter_present {
            return Err(BluezError::NotReady("Resource Not Ready".into()));
        }
        // The model is told when, for its timing rules (a Beurer cuff ignores an early CCCD enable).
        let connection = device.with(|m| m.connect_at(Instant::now()));
        if let Some(e) = self.inner.lock().devices.get_mut(&self.address) {
            e.connection = Some(connection);
        }
        self.connected = true;
        self.services_resolved = true;
        self.connected_changed(&emitter).await?;
        self.services_resolved_changed(&emitter).await?;
        tokio::spawn(pump(
            self.inner.clone(),
            self.conn.clone(),
            self.address.clone(),
            device,
            connection,
        ));
        Ok(())
    }

    async fn disconnect(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        self.inner.log(&self.address, "Disconnect");
        let connection = self
            .inner
            .lock()
            .devices
            .get_mut(&self.address)
            .and_then(|e| e.connection.take());
        if let (Some(device), Some(c)) = (self.device(), connection) {
            device.with(|m| {
                if m.connection() == Some(c) {
                    m.disconnect();
                }
            });
        }
        if self.connected {
            self.connected = false;
            self.services_resolved = false;
            self.connected_changed(&emitter).await?;
            self.services_resolved_changed(&emitter).await?;
        }
        Ok(())
    }

    async fn pair(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        self.inner.log(&self.address, "Pair");
        if self.paired {
            return Err(BluezError::AlreadyExists("Already Exists".into()));
        }
        let (passkey, agent) = {
            let st = self.inner.lock();
            let passkey = st.devices.get(&self.address).and_then(|d| d.fake.passkey);
            (passkey, st.agent.clone())
        };
        if let Some(expected) = passkey {
            let Some((owner, path)) = agent else {
                return Err(BluezError::AuthenticationFailed(
                    "Authentication Failed".into(),
                ));
            };
            let dev_path = ObjectPath::try_from(device_path(&self.address))
                .map_err(|e| BluezError::Failed(e.to_string()))?;
            let reply = self
                .conn
                .call_method(
                    Some(owner.as_str()),
                    path.as_str(),
                    Some("org.bluez.Agent1"),
                    "RequestPasskey",
                    &(dev_path,),
                )
                .await;
            let entered: u32 = match reply {
                Ok(m) => m
                    .body()
                    .deserialize()
                    .map_err(|e| BluezError::Failed(e.to_string()))?,
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.bluez.Error.Canceled" =>
                {
                    return Err(BluezError::AuthenticationCanceled(
                        "Authentication Canceled".into(),
                    ));
                }
                Err(_) => {
                    return Err(BluezError::AuthenticationRejected(
                        "Authentication Rejected".into(),
                    ));
                }
            };
            if entered != expected {
                self.inner.log(&self.address, "Pair: wrong passkey");
                return Err(BluezError::AuthenticationFailed(
                    "Authentication Failed".into(),
                ));
            }
        }
        if let Some(device) = self.device() {
            device.with(SimModel::bond);
        }
        if let Some(e) = self.inner.lock().devices.get_mut(&self.address) {
            e.paired = true;
        }
        self.paired = true;
        self.paired_changed(&emitter).await?;
        self.bonded_changed(&emitter).await?;
        Ok(())
    }

    async fn cancel_pairing(&self) -> Result<(), BluezError> {
        Ok(())
    }

    #[zbus(property)]
    fn address(&self) -> String {
        self.address.clone()
    }
    #[zbus(property)]
    fn address_type(&self) -> String {
        "public".into()
    }
    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[zbus(property)]
    fn alias(&self) -> String {
        self.name.clone()
    }
    #[zbus(property)]
    fn paired(&self) -> bool {
        self.paired
    }
    #[zbus(property)]
    fn bonded(&self) -> bool {
        self.paired
    }
    #[zbus(property)]
    fn trusted(&self) -> bool {
        self.trusted
    }
    #[zbus(property)]
    fn set_trusted(&mut self, trusted: bool) {
        self.inner.log(&self.address, format!("Trusted={trusted}"));
        self.trusted = trusted;
    }
    #[zbus(property)]
    fn blocked(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn legacy_pairing(&self) -> bool {
        false
    }
    #[zbus(property)]
    fn connected(&self) -> bool {
        self.connected
    }
    #[zbus(property)]
    fn services_resolved(&self) -> bool {
        self.services_resolved
    }
    #[zbus(property, name = "RSSI")]
    fn rssi(&self) -> i16 {
        self.rssi
    }
    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        self.service_uuids.clone()
    }
    #[zbus(property)]
    fn adapter(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(ADAPTER_PATH).unwrap_or_default()
    }
}

struct GattService {
    uuid: String,
    device: String,
}

#[interface(name = "org.bluez.GattService1")]
impl GattService {
    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        self.uuid.clone()
    }
    #[zbus(property)]
    fn primary(&self) -> bool {
        true
    }
    #[zbus(property)]
    fn device(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.device.as_str()).unwrap_or_default()
    }
}

struct GattCharacteristic {
    inner: Arc<Inner>,
    address: String,
    uuid16: u16,
    service: String,
    flags: Vec<String>,
    value: Vec<u8>,
    notifying: bool,
}

impl GattCharacteristic {
    /// Runs `f` on the model if this device's current connection is live.
    fn on_model<R>(
        &self,
        f: impl FnOnce(&mut SimModel) -> Result<R, LinkError>,
    ) -> Result<R, BluezError> {
        let (device, connection) = {
            let st = self.inner.lock();
            let e = st
                .devices
                .get(&self.address)
                .ok_or_else(|| BluezError::Failed("Device gone".into()))?;
            (e.fake.device.clone(), e.connection)
        };
        let Some(connection) = connection else {
            return Err(gatt_error(LinkError::Disconnected));
        };
        device
            .with(|m| {
                if m.connection() == Some(connection) {
                    f(m)
                } else {
                    Err(LinkError::Disconnected)
                }
            })
            .map_err(gatt_error)
    }
}

#[interface(name = "org.bluez.GattCharacteristic1")]
impl GattCharacteristic {
    async fn read_value(
        &mut self,
        _options: std::collections::HashMap<String, OwnedValue>,
    ) -> Result<Vec<u8>, BluezError> {
        self.inner
            .log(&self.address, format!("ReadValue {:04X}", self.uuid16));
        let uuid = self.uuid16;
        if uuid == uuid::BATTERY_LEVEL {
            let battery = self
                .inner
                .lock()
                .devices
                .get(&self.address)
                .and_then(|e| e.fake.battery.clone());
            // The link must be up, and the model sees the request (its CCCD timing counts from it).
            self.on_model(|m| {
                m.request_at(Instant::now());
                Ok(())
            })?;
            let v = battery.ok_or_else(|| gatt_error(LinkError::Missing(uuid)))?;
            self.value.clone_from(&v);
            return Ok(v);
        }
        let v = self.on_model(|m| {
            m.request_at(Instant::now());
            m.read(uuid, unix_now())
        })?;
        self.value.clone_from(&v);
        Ok(v)
    }

    async fn write_value(
        &mut self,
        value: Vec<u8>,
        _options: std::collections::HashMap<String, OwnedValue>,
    ) -> Result<(), BluezError> {
        let uuid = self.uuid16;
        let refused = uuid == uuid::RACP && {
            let mut st = self.inner.lock();
            match st.devices.get_mut(&self.address) {
                Some(e) if e.fake.refuse_racp_writes > 0 => {
                    e.fake.refuse_racp_writes -= 1;
                    true
                }
                _ => false,
            }
        };
        let r = if refused {
            Err(gatt_error(LinkError::Att(0x80)))
        } else {
            self.on_model(|m| {
                m.request_at(Instant::now());
                m.write(uuid, &value, unix_now())
            })
        };
        let hex: String = value.iter().map(|b| format!("{b:02X}")).collect();
        let outcome = match &r {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{e:?}"),
        };
        self.inner.log(
            &self.address,
            format!("WriteValue {uuid:04X} {hex} -> {outcome}"),
        );
        r
    }

    async fn start_notify(
        &mut self,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        self.inner
            .log(&self.address, format!("StartNotify {:04X}", self.uuid16));
        let uuid = self.uuid16;
        // Fault injection: a device that ignores CCCD writes right after discovery (Beurer BM85,
        // derdilla PR #729) answers success but does not enable anything the first time.
        let ignore = {
            let mut st = self.inner.lock();
            match st.devices.get_mut(&self.address) {
                Some(e) if e.fake.ignore_first_cccd_writes => e.ignored_cccds.insert(uuid),
                _ => false,
            }
        };
        if !ignore {
            self.on_model(|m| m.subscribe_at(uuid, Instant::now()))?;
        }
        self.notifying = true;
        self.notifying_changed(&emitter).await?;
        Ok(())
    }

    async fn stop_notify(&mut self) -> Result<(), BluezError> {
        if !self.notifying {
            return Err(BluezError::Failed("No notify session started".into()));
        }
        self.notifying = false;
        Ok(())
    }

    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        full_uuid(self.uuid16)
    }
    #[zbus(property)]
    fn service(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.service.as_str()).unwrap_or_default()
    }
    #[zbus(property)]
    fn value(&self) -> Vec<u8> {
        self.value.clone()
    }
    #[zbus(property)]
    fn notifying(&self) -> bool {
        self.notifying
    }
    #[zbus(property)]
    fn flags(&self) -> Vec<String> {
        self.flags.clone()
    }
}

struct GattDescriptor {
    characteristic: String,
}

#[interface(name = "org.bluez.GattDescriptor1")]
impl GattDescriptor {
    async fn read_value(
        &self,
        _options: std::collections::HashMap<String, OwnedValue>,
    ) -> Result<Vec<u8>, BluezError> {
        Ok(vec![0, 0])
    }

    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        full_uuid(0x2902)
    }
    #[zbus(property)]
    fn characteristic(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(self.characteristic.as_str()).unwrap_or_default()
    }
    #[zbus(property)]
    fn value(&self) -> Vec<u8> {
        vec![0, 0]
    }
    #[zbus(property)]
    fn flags(&self) -> Vec<String> {
        vec!["read".into(), "write".into()]
    }
}

/// The Bluetooth base UUID with a 16-bit UUID in it.
pub fn full_uuid(u: u16) -> String {
    format!("0000{u:04x}-0000-1000-8000-00805f9b34fb")
}

fn flags_of(u: u16) -> Vec<String> {
    let f: &[&str] = match u {
        uuid::GLUCOSE_MEASUREMENT | uuid::GLUCOSE_CONTEXT | uuid::INTERMEDIATE_CUFF_PRESSURE => {
            &["notify"]
        }
        uuid::RACP => &["write", "indicate"],
        uuid::BP_MEASUREMENT => &["indicate"],
        uuid::CURRENT_TIME => &["read", "write", "notify"],
        uuid::DATE_TIME => &["read", "write"],
        _ => &["read"],
    };
    f.iter().map(|s| (*s).to_owned()).collect()
}

/// Which service a characteristic lives in: Device Information, Current Time, or the device's own.
fn service_of(u: u16, primary: u16) -> u16 {
    match u {
        uuid::MODEL_NUMBER | uuid::SERIAL_NUMBER | uuid::MANUFACTURER_NAME => 0x180A,
        uuid::CURRENT_TIME => 0x1805,
        uuid::BATTERY_LEVEL => gateway::sources::BATTERY_SERVICE,
        _ => primary,
    }
}

/// Moves a connection's outputs from the model to D-Bus signals until the connection ends, then reports
/// the device disconnected (a link dropped by the device, or by `Disconnect`).
async fn pump(
    inner: Arc<Inner>,
    conn: Connection,
    address: String,
    device: SimDevice,
    connection: u64,
) {
    let server = conn.object_server();
    let chars = inner
        .lock()
        .devices
        .get(&address)
        .map(|d| d.chars.clone())
        .unwrap_or_default();
    while let Some(output) = device.next_output(connection).await {
        match output {
            DeviceOutput::Notify(mut n) => {
                let Some(path) = chars.get(&n.uuid) else {
                    continue;
                };
                if n.uuid == uuid::GLUCOSE_MEASUREMENT {
                    let mut st = inner.lock();
                    if let Some(e) = st.devices.get_mut(&address) {
                        let seq = n.value.get(1..3).map(|b| u16::from_le_bytes([b[0], b[1]]));
                        if let Some(seq) = seq {
                            if e.fake.corrupt.contains(&seq) {
                                n.value.truncate(4);
                            } else if let Some(left) =
                                e.fake.garble.get_mut(&seq).filter(|left| **left > 0)
                            {
                                *left -= 1;
                                n.value.truncate(3 + *left as usize);
                            }
                        }
                    }
                }
                if let Ok(iface) = server
                    .interface::<_, GattCharacteristic>(path.as_str())
                    .await
                {
                    let mut c = iface.get_mut().await;
                    c.value = n.value;
                    let _ = c.value_changed(iface.signal_emitter()).await;
                }
            }
            DeviceOutput::Disconnect => break,
        }
    }
    // The connection is over (dropped by the device or by Disconnect): say so once, if still current.
    let still_ours = {
        let mut st = inner.lock();
        match st.devices.get_mut(&address) {
            Some(e) if e.connection == Some(connection) => {
                e.connection = None;
                true
            }
            _ => false,
        }
    };
    if still_ours {
        set_disconnected(&conn, &address).await;
    }
}

async fn set_disconnected(conn: &Connection, address: &str) {
    if let Ok(iface) = conn
        .object_server()
        .interface::<_, Device>(device_path(address).as_str())
        .await
    {
        let mut d = iface.get_mut().await;
        if d.connected {
            d.connected = false;
            d.services_resolved = false;
            let _ = d.connected_changed(iface.signal_emitter()).await;
            let _ = d.services_resolved_changed(iface.signal_emitter()).await;
        }
    }
}

// -------------------------------------------------------------------------------------------------------
// The service
// -------------------------------------------------------------------------------------------------------

/// Takes `org.bluez` on `conn`, waiting for the previous owner (the last test's, a hung one) to let go.
async fn own_bluez_name(conn: &Connection) -> zbus::Result<()> {
    let mut tries = 0;
    loop {
        match conn.request_name("org.bluez").await {
            Ok(()) => return Ok(()),
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// bluetoothd hung ([`FakeBluez::hang`]) or stopped ([`FakeBluez::stop`]).
#[derive(Debug)]
pub struct Outage<'a> {
    fake: &'a FakeBluez,
    /// The owner of `org.bluez` that answers nothing, while hung.
    silent: Option<Connection>,
}

impl Outage<'_> {
    /// bluetoothd answers again: the silent owner (if any) goes and the fake takes the name back.
    ///
    /// # Errors
    /// A zbus error.
    pub async fn resume(self) -> zbus::Result<()> {
        if let Some(silent) = self.silent {
            silent.release_name("org.bluez").await?;
        }
        own_bluez_name(&self.fake.conn).await
    }
}

/// The fake `org.bluez`. Dropping it releases the name and stops its tasks.
#[derive(Debug)]
pub struct FakeBluez {
    conn: Connection,
    conn_address: String,
    inner: Arc<Inner>,
    advertiser: tokio::task::JoinHandle<()>,
}

impl Drop for FakeBluez {
    fn drop(&mut self) {
        self.advertiser.abort();
    }
}

impl FakeBluez {
    /// Connects to the private bus at `address`, owns `org.bluez`, and serves an adapter `hci0` (powered).
    ///
    /// # Errors
    /// A zbus error (bus unreachable, name taken).
    pub async fn start(address: &str) -> zbus::Result<FakeBluez> {
        let conn = zbus::connection::Builder::address(address)?.build().await?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
        });
        conn.object_server()
            .at("/", zbus::fdo::ObjectManager)
            .await?;
        conn.object_server()
            .at(
                "/org/bluez",
                AgentManager {
                    inner: inner.clone(),
                },
            )
            .await?;
        own_bluez_name(&conn).await?;
        let advertiser = tokio::spawn(advertise(conn.clone(), inner.clone()));
        let fake = FakeBluez {
            conn,
            conn_address: address.to_owned(),
            inner,
            advertiser,
        };
        fake.add_adapter().await?;
        Ok(fake)
    }

    /// The next `n` `RegisterAgent` calls get no answer (as when the caller's connection loses the
    /// reply); the agent is not registered by them.
    pub fn leave_register_agent_unanswered(&self, n: usize) {
        self.inner.lock().unanswered_register_agent = n;
    }

    /// bluetoothd hangs: `org.bluez` stays owned, but by a connection that answers nothing, so every call
    /// waits for its caller's time-out. The fake's objects stay as they were; [`Hung::resume`] gives the
    /// name back to them.
    ///
    /// # Errors
    /// A zbus error.
    pub async fn hang(&self) -> zbus::Result<Outage<'_>> {
        self.conn.release_name("org.bluez").await?;
        let silent = zbus::connection::Builder::address(self.conn_address.as_str())?
            .build()
            .await?;
        // No object server is ever set up on `silent`: zbus leaves method calls to it unanswered.
        own_bluez_name(&silent).await?;
        Ok(Outage {
            fake: self,
            silent: Some(silent),
        })
    }

    /// bluetoothd stops (or was never started): nobody owns `org.bluez`, and the bus answers every call
    /// to it with `ServiceUnknown`. [`Outage::resume`] starts it again, with the objects it had.
    ///
    /// # Errors
    /// A zbus error.
    pub async fn stop(&self) -> zbus::Result<Outage<'_>> {
        self.conn.release_name("org.bluez").await?;
        Ok(Outage {
            fake: self,
            silent: None,
        })
    }

    /// The adapter appears (plugged in, or bluetoothd restarted), with every device it knew.
    ///
    /// # Errors
    /// A zbus error.
    pub async fn add_adapter(&self) -> zbus::Result<()> {
        self.inner.lock().adapter_present = true;
        self.conn
            .object_server()
            .at(
                ADAPTER_PATH,
                Adapter {
                    inner: self.inner.clone(),
                    powered: true,
                    discovering: false,
                },
            )
            .await?;
        let devices: Vec<FakeDevice> = self
            .inner
            .lock()
            .devices
            .values()
            .map(|d| d.fake.clone())
            .collect();
        for d in devices {
            self.serve_device(&d).await?;
        }
        Ok(())
    }

    /// The adapter disappears (USB dongle pulled): every connection drops and the adapter, its devices and
    /// their GATT objects are removed (`InterfacesRemoved`).
    ///
    /// # Errors
    /// A zbus error.
    pub async fn remove_adapter(&self) -> zbus::Result<()> {
        let entries: Vec<(String, SimDevice, Vec<String>)> = {
            let mut st = self.inner.lock();
            st.adapter_present = false;
            st.discovering = false;
            st.devices
                .values_mut()
                .map(|e| {
                    e.connection = None;
                    (
                        e.fake.address.clone(),
                        e.fake.device.clone(),
                        e.chars.values().cloned().collect(),
                    )
                })
                .collect()
        };
        let server = self.conn.object_server();
        for (address, device, chars) in entries {
            device.with(|m| {
                if m.connection().is_some() {
                    m.disconnect();
                }
            });
            set_disconnected(&self.conn, &address).await;
            for c in &chars {
                server
                    .remove::<GattDescriptor, _>(format!("{c}/desc0001"))
                    .await
                    .ok();
                server
                    .remove::<GattCharacteristic, _>(c.as_str())
                    .await
                    .ok();
            }
            let dev = device_path(&address);
            for s in ["service0001", "service0100", "service0200", "service0300"] {
                server
                    .remove::<GattService, _>(format!("{dev}/{s}"))
                    .await
                    .ok();
            }
            server.remove::<Device, _>(dev.as_str()).await.ok();
        }
        server.remove::<Adapter, _>(ADAPTER_PATH).await?;
        Ok(())
    }

    /// A device in range of the adapter (advertising while the adapter discovers).
    ///
    /// # Errors
    /// A zbus error.
    pub async fn add_device(&self, fake: FakeDevice) -> zbus::Result<()> {
        self.inner.lock().devices.insert(
            fake.address.clone(),
            DeviceEntry {
                fake: fake.clone(),
                connection: None,
                chars: BTreeMap::new(),
                paired: false,
                ignored_cccds: Default::default(),
            },
        );
        if self.inner.lock().adapter_present {
            self.serve_device(&fake).await?;
        }
        Ok(())
    }

    async fn serve_device(&self, fake: &FakeDevice) -> zbus::Result<()> {
        let (primary, mut chars) = fake.device.with(|m| (m.service(), m.characteristics()));
        if fake.battery.is_some() && !chars.contains(&uuid::BATTERY_LEVEL) {
            chars.push(uuid::BATTERY_LEVEL);
        }
        let dev = fake.path();
        let paired = self
            .inner
            .lock()
            .devices
            .get(&fake.address)
            .is_some_and(|d| d.paired);
        let server = self.conn.object_server();
        // Services: the device's own (0001), Device Information (0100), Current Time (0200), Battery
        // (0300).
        let service_path = |s: u16| -> String {
            match s {
                0x180A => format!("{dev}/service0100"),
                0x1805 => format!("{dev}/service0200"),
                gateway::sources::BATTERY_SERVICE => format!("{dev}/service0300"),
                _ => format!("{dev}/service0001"),
            }
        };
        server
            .at(
                dev.as_str(),
                Device {
                    inner: self.inner.clone(),
                    conn: self.conn.clone(),
                    address: fake.address.clone(),
                    name: fake.name.clone(),
                    service_uuids: vec![full_uuid(primary)],
                    rssi: fake.rssi,
                    connected: false,
                    services_resolved: false,
                    paired,
                    trusted: paired,
                },
            )
            .await?;
        let mut services: Vec<u16> = chars.iter().map(|&c| service_of(c, primary)).collect();
        services.sort_unstable();
        services.dedup();
        for s in services {
            server
                .at(
                    service_path(s).as_str(),
                    GattService {
                        uuid: full_uuid(s),
                        device: dev.clone(),
                    },
                )
                .await?;
        }
        let mut paths = BTreeMap::new();
        for (i, &c) in chars.iter().enumerate() {
            let service = service_path(service_of(c, primary));
            let path = format!("{service}/char{:04x}", i + 2);
            let flags = flags_of(c);
            let notifies = flags.iter().any(|f| f == "notify" || f == "indicate");
            server
                .at(
                    path.as_str(),
                    GattCharacteristic {
                        inner: self.inner.clone(),
                        address: fake.address.clone(),
                        uuid16: c,
                        service: service.clone(),
                        flags,
                        value: Vec::new(),
                        notifying: false,
                    },
                )
                .await?;
            if notifies {
                server
                    .at(
                        format!("{path}/desc0001").as_str(),
                        GattDescriptor {
                            characteristic: path.clone(),
                        },
                    )
                    .await?;
            }
            paths.insert(c, path);
        }
        if let Some(e) = self.inner.lock().devices.get_mut(&fake.address) {
            e.chars = paths;
        }
        Ok(())
    }

    /// Everything the gateway asked, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().calls.clone()
    }

    /// The calls made on one device.
    pub fn calls_to(&self, address: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.target == address)
            .map(|c| c.method)
            .collect()
    }

    /// For each call `method` made on the device, how long after the device's previous call it came
    /// (the exchange a timing rule such as a cuff's early-CCCD window measures from).
    pub fn gaps_before(&self, address: &str, method: &str) -> Vec<Duration> {
        let calls: Vec<Call> = self
            .calls()
            .into_iter()
            .filter(|c| c.target == address)
            .collect();
        calls
            .windows(2)
            .filter(|w| w[1].method == method)
            .map(|w| w[1].at.saturating_duration_since(w[0].at))
            .collect()
    }

    /// Whether the device is paired (bonded) on the adapter.
    pub fn is_paired(&self, address: &str) -> bool {
        self.inner
            .lock()
            .devices
            .get(address)
            .is_some_and(|d| d.paired)
    }

    /// Whether the adapter is discovering.
    pub fn is_discovering(&self) -> bool {
        self.inner.lock().discovering
    }

    /// Changes a served device's fault injection (`garble`, `corrupt`, `refuse_racp_writes`, …) between
    /// sessions; the model's own faults are the model's (`SimDevice::with_glucometer`).
    pub fn set_faults(&self, address: &str, f: impl FnOnce(&mut FakeDevice)) {
        if let Some(e) = self.inner.lock().devices.get_mut(address) {
            f(&mut e.fake);
        }
    }

    /// The device's `PropertiesChanged(RSSI)` signals as fast as the bus takes them, for `period` — a
    /// crowded radio seen through BlueZ. Returns how many were sent.
    pub async fn chatter(&self, address: &str, period: Duration) -> u64 {
        let Ok(iface) = self
            .conn
            .object_server()
            .interface::<_, Device>(device_path(address).as_str())
            .await
        else {
            return 0;
        };
        let end = Instant::now() + period;
        let mut sent = 0;
        while Instant::now() < end {
            let mut d = iface.get_mut().await;
            d.rssi = if d.rssi == -60 { -61 } else { -60 };
            let _ = d.r_s_s_i_changed(iface.signal_emitter()).await;
            sent += 1;
        }
        sent
    }

    /// Drops the device's current connection from the device side (out of range).
    pub fn drop_link(&self, address: &str) {
        let device = self
            .inner
            .lock()
            .devices
            .get(address)
            .map(|d| d.fake.device.clone());
        if let Some(d) = device {
            d.drop_connection();
        }
    }
}

/// While the adapter discovers, every unconnected device advertises: an `RSSI` `PropertiesChanged` every
/// 100 ms (BlueZ with `DuplicateData: true`), which btleplug turns into `DeviceUpdated` / `RssiUpdate`.
async fn advertise(conn: Connection, inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut flip = false;
    loop {
        tick.tick().await;
        flip = !flip;
        let addresses: Vec<String> = {
            let st = inner.lock();
            if !st.discovering || !st.adapter_present {
                continue;
            }
            st.devices
                .values()
                .filter(|d| d.connection.is_none())
                .map(|d| d.fake.address.clone())
                .collect()
        };
        for a in addresses {
            let Ok(iface) = conn
                .object_server()
                .interface::<_, Device>(device_path(&a).as_str())
                .await
            else {
                continue;
            };
            let mut d = iface.get_mut().await;
            if d.connected {
                continue;
            }
            // A real RSSI wobbles; a changed value is what makes bluetoothd signal it.
            d.rssi += if flip { 1 } else { -1 };
            let _ = d.r_s_s_i_changed(iface.signal_emitter()).await;
        }
    }
}
