//! Pairing through BlueZ over D-Bus: `Device1.Pair`, an `Agent1` for the passkey, `Trusted`, and
//! `Adapter1.RemoveDevice` to unpair.
//!
//! btleplug has no pairing API. bluetoothd asks a registered agent for the passkey a meter displays
//! (Accu-Chek Guide, SBM69: "enter the PIN shown on the meter"); the agent lives on our own D-Bus
//! connection ([`super::bus`]). The agent is registered for the duration of one `pair` call and answers
//! only `RequestPasskey` (with the passkey its owner supplies), `RequestConfirmation` /
//! `RequestAuthorization` (accepted: the user started this pairing) and `Cancel` / `Release`; everything
//! else is refused (BlueZ doc/org.bluez.Agent.rst).

use std::sync::Arc;
use std::time::Duration;

use dbus::channel::{MatchingReceiver as _, Sender as _};
use dbus::message::MatchRule;
use dbus::nonblock::SyncConnection;
use dbus::nonblock::stdintf::org_freedesktop_dbus::Properties as _;
use dbus::{Message, MethodErr};

use super::bus::{self, Bus};

/// Where the agent is served on our connection.
const AGENT_PATH: &str = "/org/phg/agent";
/// The agent's interface (BlueZ doc/org.bluez.Agent.rst).
const AGENT_INTERFACE: &str = "org.bluez.Agent1";
/// How long a plain call to bluetoothd may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(25);
/// How long `RegisterAgent` and `UnregisterAgent` may take. bluetoothd answers them at once, so silence
/// means the reply was lost: this stack (dbus-tokio) has been seen to leave a reply unread on one
/// connection for tens of seconds while a new connection is answered at once (docs/ble.md).
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why pairing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// The system bus (or bluetoothd on it) is unreachable.
    #[error("D-Bus: {0}")]
    Bus(String),
    /// The device refused or the passkey was wrong (`org.bluez.Error.Authentication*`).
    #[error("pairing refused: {0}")]
    Refused(String),
    /// Pairing did not finish in time (the device left pairing mode).
    #[error("pairing timed out")]
    Timeout,
    /// BlueZ does not know the device (not seen by a scan).
    #[error("unknown device {0}")]
    UnknownDevice(String),
}

/// Supplies the passkey a device displays, for its object path; `None` cancels.
pub type PasskeyProvider = Arc<dyn Fn(&str) -> Option<u32> + Send + Sync>;

/// Answers one call to the agent. `Some` is the reply to send now; `None`: a task sends it later.
fn answer(
    call: &Message,
    passkey: Option<&PasskeyProvider>,
    conn: &Arc<SyncConnection>,
) -> Option<Message> {
    let rejected = |why: &str| MethodErr::from(("org.bluez.Error.Rejected", why)).to_message(call);
    let member = call.member().map(|m| m.to_string()).unwrap_or_default();
    match member.as_str() {
        "RequestPasskey" => {
            let Some(provider) = passkey.cloned() else {
                return Some(rejected("no passkey entry on this agent"));
            };
            let device = call
                .get1::<dbus::Path>()
                .map(|p| p.to_string())
                .unwrap_or_default();
            // Both answers made now: a reply must name the call's serial, which a copy of the call
            // would not keep.
            let entered = call.method_return();
            let cancelled =
                MethodErr::from(("org.bluez.Error.Canceled", "passkey entry cancelled"))
                    .to_message(call);
            let conn = Arc::clone(conn);
            tokio::spawn(async move {
                // The provider may block on a terminal prompt.
                let reply = match tokio::task::spawn_blocking(move || provider(&device)).await {
                    Ok(Some(p)) => entered.append1(p),
                    _ => cancelled,
                };
                let _ = conn.send(reply);
            });
            None
        }
        "RequestPinCode" => Some(rejected("legacy PIN pairing is not supported")),
        "RequestConfirmation"
        | "RequestAuthorization"
        | "Release"
        | "Cancel"
        | "DisplayPasskey"
        | "DisplayPinCode" => Some(call.method_return()),
        "AuthorizeService" => Some(rejected("not a pairing request")),
        _ => Some(MethodErr::no_method(&member).to_message(call)),
    }
}

fn bus_error(e: &dbus::Error) -> PairError {
    let name = e.name().unwrap_or("");
    let described = bus::describe(e);
    if name.starts_with("org.bluez.Error.Authentication")
        || name == "org.bluez.Error.ConnectionAttemptFailed"
    {
        PairError::Refused(described)
    } else if name == "org.freedesktop.DBus.Error.UnknownObject"
        || name == "org.freedesktop.DBus.Error.UnknownMethod"
        || name == "org.bluez.Error.DoesNotExist"
    {
        PairError::UnknownDevice(e.message().unwrap_or("").to_owned())
    } else if name == "org.freedesktop.DBus.Error.NoReply" {
        PairError::Timeout
    } else {
        PairError::Bus(described)
    }
}

/// How one pairing attempt on one connection ended, when it did not pair.
enum Attempt {
    /// `RegisterAgent` got no answer in [`AGENT_CALL_TIMEOUT`]: worth once more on a new connection.
    AgentUnanswered,
    /// Anything else: the caller's answer.
    Failed(PairError),
}

/// [`Pairing::pair`] on `bus`: the agent registered on it for the `Pair` call, then `Trusted`.
async fn pair_on(
    bus: &Bus,
    adapter: &str,
    address: &str,
    passkey: Option<PasskeyProvider>,
    timeout: Duration,
) -> Result<(), Attempt> {
    let capability = if passkey.is_some() {
        "KeyboardOnly"
    } else {
        "NoInputNoOutput"
    };
    let conn = Arc::clone(bus.conn());
    let serving = bus.conn().start_receive(
        MatchRule::new_method_call()
            .with_path(AGENT_PATH)
            .with_interface(AGENT_INTERFACE),
        Box::new(move |call, _| {
            if let Some(reply) = answer(&call, passkey.as_ref(), &conn) {
                let _ = conn.send(reply);
            }
            true
        }),
    );
    let agent = dbus::Path::from(AGENT_PATH);
    // libdbus's own reply timeouts a little later than ours, so ours are the ones that fire.
    let manager = bus.bluez("/org/bluez", AGENT_CALL_TIMEOUT + Duration::from_secs(5));
    let registered = tokio::time::timeout(
        AGENT_CALL_TIMEOUT,
        manager.method_call::<(), _, _, _>(
            "org.bluez.AgentManager1",
            "RegisterAgent",
            (agent.clone(), capability),
        ),
    )
    .await;
    let result = match registered {
        Err(_) => Err(Attempt::AgentUnanswered),
        Ok(Err(e)) => Err(Attempt::Failed(bus_error(&e))),
        Ok(Ok(())) => {
            let path = device_path(adapter, address);
            let device = bus.bluez(&path, timeout + Duration::from_secs(5));
            let paired = tokio::time::timeout(
                timeout,
                device.method_call::<(), _, _, _>("org.bluez.Device1", "Pair", ()),
            )
            .await;
            match paired {
                Err(_) => Err(PairError::Timeout),
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if e.name() == Some("org.bluez.Error.AlreadyExists") => Ok(()),
                Ok(Err(e)) => Err(bus_error(&e)),
            }
            .map_err(Attempt::Failed)
        }
    };
    if result.is_ok() {
        set_trusted_on(bus, adapter, address, true)
            .await
            .map_err(Attempt::Failed)?;
    }
    // Best effort, and bounded: bluetoothd also drops an agent when its connection closes. Not over a
    // connection that just left a reply unread (it would wait out its time-out again).
    if !matches!(result, Err(Attempt::AgentUnanswered)) {
        let _ = tokio::time::timeout(
            AGENT_CALL_TIMEOUT,
            manager.method_call::<(), _, _, _>(
                "org.bluez.AgentManager1",
                "UnregisterAgent",
                (agent,),
            ),
        )
        .await;
    }
    bus.conn().stop_receive(serving);
    result
}

/// Sets `Device1.Trusted` over `bus`.
async fn set_trusted_on(
    bus: &Bus,
    adapter: &str,
    address: &str,
    trusted: bool,
) -> Result<(), PairError> {
    let path = device_path(adapter, address);
    bus.bluez(&path, CALL_TIMEOUT)
        .set("org.bluez.Device1", "Trusted", trusted)
        .await
        .map_err(|e| bus_error(&e))
}

/// The BlueZ object path of a device on an adapter (`/org/bluez/hci0/dev_AA_BB_…`).
pub fn device_path(adapter: &str, address: &str) -> String {
    format!(
        "/org/bluez/{adapter}/dev_{}",
        super::store::normalize_address(address).replace(':', "_")
    )
}

/// Pairs with BlueZ on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
#[derive(Debug, Clone)]
pub struct Pairing {
    bus: Arc<Bus>,
}

impl Pairing {
    /// Connects to the system bus.
    ///
    /// # Errors
    /// [`PairError::Bus`].
    pub async fn connect() -> Result<Pairing, PairError> {
        let bus = Bus::system().map_err(PairError::Bus)?;
        Ok(Pairing { bus: Arc::new(bus) })
    }

    /// Pairs (bonds) with the device at `address` on `adapter` (`hci0`) and marks it trusted. With a
    /// `passkey` provider the agent offers keyboard entry; without one, only "just works" pairing can
    /// succeed. An already paired device is only marked trusted. When bluetoothd leaves `RegisterAgent`
    /// unanswered, the whole attempt is made once more on a new connection of its own.
    ///
    /// # Errors
    /// [`PairError`]; the agent is unregistered (or its connection closed) in every case.
    pub async fn pair(
        &self,
        adapter: &str,
        address: &str,
        passkey: Option<PasskeyProvider>,
        timeout: Duration,
    ) -> Result<(), PairError> {
        match pair_on(&self.bus, adapter, address, passkey.clone(), timeout).await {
            Err(Attempt::AgentUnanswered) => {
                tracing::warn!(
                    "bluetoothd did not answer RegisterAgent; pairing again on a new D-Bus connection"
                );
                let fresh = Bus::system().map_err(PairError::Bus)?;
                match pair_on(&fresh, adapter, address, passkey, timeout).await {
                    Ok(()) => Ok(()),
                    Err(Attempt::AgentUnanswered) => Err(PairError::Bus(format!(
                        "bluetoothd did not answer RegisterAgent within {AGENT_CALL_TIMEOUT:?}"
                    ))),
                    Err(Attempt::Failed(e)) => Err(e),
                }
            }
            Err(Attempt::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// Sets `Device1.Trusted`.
    ///
    /// # Errors
    /// [`PairError`].
    pub async fn set_trusted(
        &self,
        adapter: &str,
        address: &str,
        trusted: bool,
    ) -> Result<(), PairError> {
        set_trusted_on(&self.bus, adapter, address, trusted).await
    }

    /// Unpairs: `Adapter1.RemoveDevice` (bluetoothd forgets the bond).
    ///
    /// # Errors
    /// [`PairError`].
    pub async fn remove(&self, adapter: &str, address: &str) -> Result<(), PairError> {
        let device = dbus::Path::new(device_path(adapter, address)).map_err(PairError::Bus)?;
        self.bus
            .bluez(&format!("/org/bluez/{adapter}"), CALL_TIMEOUT)
            .method_call::<(), _, _, _>("org.bluez.Adapter1", "RemoveDevice", (device,))
            .await
            .map_err(|e| bus_error(&e))
    }
}
