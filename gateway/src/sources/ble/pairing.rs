//! Pairing through BlueZ over D-Bus with zbus: `Device1.Pair`, an `Agent1` for the passkey, `Trusted`,
//! and `Adapter1.RemoveDevice` to unpair.
//!
//! btleplug has no pairing API. bluetoothd asks a registered agent for the passkey a meter displays
//! (Accu-Chek Guide, SBM69: "enter the PIN shown on the meter"); the agent lives on our own D-Bus
//! connection, so it is served with zbus (see gateway/Cargo.toml for why zbus). The agent is registered
//! for the duration of one `pair` call and answers only `RequestPasskey` (with the passkey its owner
//! supplies), `RequestConfirmation` / `RequestAuthorization` (accepted: the user started this pairing) and
//! `Cancel`; everything else is refused.

use std::sync::Arc;
use std::time::Duration;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{Connection, interface};

/// Where the agent is served on our connection.
const AGENT_PATH: &str = "/org/phg/agent";

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

struct Agent {
    passkey: Option<PasskeyProvider>,
}

/// `org.bluez.Error.Rejected` / `Canceled`, what an agent answers to refuse.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bluez.Error")]
enum AgentError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Rejected(String),
    Canceled(String),
}

#[interface(name = "org.bluez.Agent1")]
impl Agent {
    async fn release(&self) {}

    async fn request_passkey(&self, device: ObjectPath<'_>) -> Result<u32, AgentError> {
        let Some(provider) = &self.passkey else {
            return Err(AgentError::Rejected(
                "no passkey entry on this agent".into(),
            ));
        };
        let provider = provider.clone();
        let device = device.to_string();
        // The provider may block on a terminal prompt.
        match tokio::task::spawn_blocking(move || provider(&device)).await {
            Ok(Some(p)) => Ok(p),
            _ => Err(AgentError::Canceled("passkey entry cancelled".into())),
        }
    }

    async fn request_pin_code(&self, _device: ObjectPath<'_>) -> Result<String, AgentError> {
        Err(AgentError::Rejected(
            "legacy PIN pairing is not supported".into(),
        ))
    }

    async fn display_passkey(&self, _device: ObjectPath<'_>, _passkey: u32, _entered: u16) {}

    async fn display_pin_code(&self, _device: ObjectPath<'_>, _pincode: String) {}

    async fn request_confirmation(
        &self,
        _device: ObjectPath<'_>,
        _passkey: u32,
    ) -> Result<(), AgentError> {
        Ok(())
    }

    async fn request_authorization(&self, _device: ObjectPath<'_>) -> Result<(), AgentError> {
        Ok(())
    }

    async fn authorize_service(
        &self,
        _device: ObjectPath<'_>,
        _uuid: String,
    ) -> Result<(), AgentError> {
        Err(AgentError::Rejected("not a pairing request".into()))
    }

    async fn cancel(&self) {}
}

/// The BlueZ object path of a device on an adapter (`/org/bluez/hci0/dev_AA_BB_…`).
pub fn device_path(adapter: &str, address: &str) -> String {
    format!(
        "/org/bluez/{adapter}/dev_{}",
        super::store::normalize_address(address).replace(':', "_")
    )
}

fn bus(e: zbus::Error) -> PairError {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            let name = name.as_str();
            let msg = msg.unwrap_or_default();
            if name.starts_with("org.bluez.Error.Authentication")
                || name == "org.bluez.Error.ConnectionAttemptFailed"
            {
                PairError::Refused(format!("{name}: {msg}"))
            } else if name == "org.freedesktop.DBus.Error.UnknownObject"
                || name == "org.freedesktop.DBus.Error.UnknownMethod"
                || name == "org.bluez.Error.DoesNotExist"
            {
                PairError::UnknownDevice(msg)
            } else {
                PairError::Bus(format!("{name}: {msg}"))
            }
        }
        e => PairError::Bus(e.to_string()),
    }
}

/// Pairs with BlueZ on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
#[derive(Debug, Clone)]
pub struct Pairing {
    conn: Connection,
}

impl Pairing {
    /// Connects to the system bus.
    ///
    /// # Errors
    /// [`PairError::Bus`].
    pub async fn connect() -> Result<Pairing, PairError> {
        let conn = Connection::system().await.map_err(bus)?;
        Ok(Pairing { conn })
    }

    /// Pairs (bonds) with the device at `address` on `adapter` (`hci0`) and marks it trusted. With a
    /// `passkey` provider the agent offers keyboard entry; without one, only "just works" pairing can
    /// succeed. An already paired device is only marked trusted.
    ///
    /// # Errors
    /// [`PairError`]; the agent is unregistered in every case.
    pub async fn pair(
        &self,
        adapter: &str,
        address: &str,
        passkey: Option<PasskeyProvider>,
        timeout: Duration,
    ) -> Result<(), PairError> {
        let capability = if passkey.is_some() {
            "KeyboardOnly"
        } else {
            "NoInputNoOutput"
        };
        let server = self.conn.object_server();
        server
            .at(AGENT_PATH, Agent { passkey })
            .await
            .map_err(bus)?;
        let agent =
            OwnedObjectPath::try_from(AGENT_PATH).map_err(|e| PairError::Bus(e.to_string()))?;
        let result = async {
            self.conn
                .call_method(
                    Some("org.bluez"),
                    "/org/bluez",
                    Some("org.bluez.AgentManager1"),
                    "RegisterAgent",
                    &(&agent, capability),
                )
                .await
                .map_err(bus)?;
            let path = device_path(adapter, address);
            let paired = tokio::time::timeout(
                timeout,
                self.conn.call_method(
                    Some("org.bluez"),
                    path.as_str(),
                    Some("org.bluez.Device1"),
                    "Pair",
                    &(),
                ),
            )
            .await;
            match paired {
                Err(_) => return Err(PairError::Timeout),
                Ok(Ok(_)) => {}
                Ok(Err(zbus::Error::MethodError(name, _, _)))
                    if name.as_str() == "org.bluez.Error.AlreadyExists" => {}
                Ok(Err(e)) => return Err(bus(e)),
            }
            self.set_trusted(adapter, address, true).await
        }
        .await;
        let _ = self
            .conn
            .call_method(
                Some("org.bluez"),
                "/org/bluez",
                Some("org.bluez.AgentManager1"),
                "UnregisterAgent",
                &(&agent,),
            )
            .await;
        let _ = server.remove::<Agent, _>(AGENT_PATH).await;
        result
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
        let path = device_path(adapter, address);
        self.conn
            .call_method(
                Some("org.bluez"),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Set",
                &(
                    "org.bluez.Device1",
                    "Trusted",
                    zbus::zvariant::Value::from(trusted),
                ),
            )
            .await
            .map_err(bus)?;
        Ok(())
    }

    /// Unpairs: `Adapter1.RemoveDevice` (bluetoothd forgets the bond).
    ///
    /// # Errors
    /// [`PairError`].
    pub async fn remove(&self, adapter: &str, address: &str) -> Result<(), PairError> {
        let path = ObjectPath::try_from(device_path(adapter, address))
            .map_err(|e| PairError::Bus(e.to_string()))?;
        self.conn
            .call_method(
                Some("org.bluez"),
                format!("/org/bluez/{adapter}").as_str(),
                Some("org.bluez.Adapter1"),
                "RemoveDevice",
                &(path,),
            )
            .await
            .map_err(bus)?;
        Ok(())
    }
}
