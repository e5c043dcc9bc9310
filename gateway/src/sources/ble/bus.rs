//! The gateway's own connection to the system bus, for what btleplug cannot do: pairing (with an agent
//! for the passkey, [`super::pairing`]) and connecting without a match ([`super::feeds`]).
//!
//! It speaks through libdbus with dbus-rs and dbus-tokio, the binding btleplug's BlueZ backend
//! (bluez-async) already links, rather than a second D-Bus implementation: zbus and zvariant were about
//! 1 MB of the gateway's binary (docs/raspberry-pi.md, issue 14's 8 MB goal).

use std::sync::Arc;
use std::time::Duration;

use dbus::nonblock::{Proxy, SyncConnection};
use tokio::task::JoinHandle;

/// bluetoothd's bus name.
pub const BLUEZ: &str = "org.bluez";

/// A system bus connection (`DBUS_SYSTEM_BUS_ADDRESS` is honoured, by libdbus) and the task that drives
/// it. Dropping it stops the task, so the connection closes (and the bus forgets everything registered
/// on it) once the last clone of [`Bus::conn`] is gone.
pub struct Bus {
    conn: Arc<SyncConnection>,
    driver: JoinHandle<()>,
}

impl Bus {
    /// Connects to the system bus.
    ///
    /// # Errors
    /// libdbus's error, described by [`describe`].
    pub fn system() -> Result<Bus, String> {
        let (resource, conn) =
            dbus_tokio::connection::new_system_sync().map_err(|e| describe(&e))?;
        let driver = tokio::spawn(async move {
            let lost = resource.await;
            tracing::warn!(error = %lost, "the gateway's D-Bus connection was lost");
        });
        Ok(Bus { conn, driver })
    }

    /// The connection, for serving objects on it.
    pub fn conn(&self) -> &Arc<SyncConnection> {
        &self.conn
    }

    /// bluetoothd's object at `path`; each call on it gives up after `timeout`.
    pub fn bluez<'a>(&'a self, path: &'a str, timeout: Duration) -> Proxy<'a, &'a SyncConnection> {
        Proxy::new(BLUEZ, path, timeout, &*self.conn)
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// `name: message` of a D-Bus error (`org.bluez.Error.Failed: Operation already in progress`).
pub fn describe(e: &dbus::Error) -> String {
    match (e.name(), e.message()) {
        (Some(n), Some(m)) if !m.is_empty() => format!("{n}: {m}"),
        (Some(n), _) => n.to_owned(),
        (None, Some(m)) => m.to_owned(),
        (None, None) => "unknown D-Bus error".to_owned(),
    }
}
