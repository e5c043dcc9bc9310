//! [`BleLink`]: the [`GattLink`] over btleplug (BlueZ over D-Bus) that the GLP / BLP collectors run on.
//!
//! A link is one connection to one device: [`BleLink::open`] attaches to the device's notification feed
//! *before* anything is subscribed (btleplug does not buffer values that arrive before `notifications()`
//! is called; BLUEZ.md "Easy to get wrong" 5), connects and discovers the services. The streams
//! themselves belong to the adapter's [`Feeds`] and outlive the link: opening and dropping them per
//! session leaks D-Bus match rules (see [`super::feeds`]). Every operation has its own time-out, so a
//! wedged bluetoothd ends a session instead of hanging it; the session's overall deadline is the
//! supervisor's.
//!
//! BlueZ reports the device's ATT errors as D-Bus errors (bluetoothd `gatt-client.c`,
//! `create_gatt_dbus_error`): `org.bluez.Error.NotPermitted "Not paired"` for Insufficient Authentication /
//! Encryption, `org.bluez.Error.Failed "Operation failed with ATT error: 0xNN"` for the application errors
//! the Glucose profile uses (0x80, 0x81). [`link_error`] turns them back into [`LinkError::Att`] so the
//! collector can tell "subscribe first" from "pair first".

use std::collections::HashMap;
use std::time::Duration;

use btleplug::api::{CentralEvent, Characteristic, Peripheral as _, ValueNotification, WriteType};
use btleplug::platform::{Peripheral, PeripheralId};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

use super::SelectedAdapter;
use super::feeds::{Attached, Feeds};
use super::quirks::Quirks;
use crate::sources::{GattLink, LinkError, Notification};

type Events = broadcast::Receiver<CentralEvent>;
type Values = mpsc::UnboundedReceiver<ValueNotification>;

/// How long values may trail a disconnect event before the link is reported gone.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// The 16-bit UUID of a Bluetooth-SIG-assigned 128-bit UUID (`0000xxxx-0000-1000-8000-00805f9b34fb`).
pub fn short_uuid(u: &uuid::Uuid) -> Option<u16> {
    let (d1, d2, d3, d4) = u.as_fields();
    let base =
        d2 == 0x0000 && d3 == 0x1000 && d4 == &[0x80, 0x00, 0x00, 0x80, 0x5f, 0x9b, 0x34, 0xfb];
    if base { u16::try_from(d1).ok() } else { None }
}

/// Maps a btleplug error to what a collector can act on.
pub fn link_error(e: &btleplug::Error) -> LinkError {
    match e {
        btleplug::Error::NotConnected | btleplug::Error::DeviceNotFound => LinkError::Disconnected,
        btleplug::Error::TimedOut(_) => LinkError::Timeout,
        btleplug::Error::Other(inner) => {
            match inner.downcast_ref::<bluez_async::BluetoothError>() {
                Some(bluez_async::BluetoothError::DbusError(d)) => {
                    dbus_error(d.name().unwrap_or(""), d.message().unwrap_or(""))
                }
                _ => LinkError::Disconnected,
            }
        }
        _ => LinkError::Disconnected,
    }
}

/// A D-Bus error from bluetoothd, by name and message (see the module doc).
pub fn dbus_error(name: &str, message: &str) -> LinkError {
    if let Some(i) = message.find("ATT error: 0x") {
        let hex = message.get(i + 13..i + 15).unwrap_or("");
        if let Ok(code) = u8::from_str_radix(hex, 16) {
            return LinkError::Att(code);
        }
    }
    let lower = message.to_ascii_lowercase();
    match name {
        "org.bluez.Error.NotPermitted" | "org.bluez.Error.NotAuthorized" => {
            if lower.contains("read not permitted") {
                LinkError::Att(0x02)
            } else if lower.contains("write not permitted") {
                LinkError::Att(0x03)
            } else {
                // "Not paired", "Insufficient authentication/encryption": the link needs a bond.
                LinkError::Att(crate::sources::att::INSUFFICIENT_AUTHENTICATION)
            }
        }
        "org.bluez.Error.NotSupported" => LinkError::Att(0x06),
        "org.bluez.Error.InProgress" => {
            LinkError::Att(crate::sources::att::PROCEDURE_ALREADY_IN_PROGRESS)
        }
        _ => LinkError::Disconnected,
    }
}

/// Why a link could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// `Device1.Connect` failed or did not resolve services in time.
    #[error("connect: {0}")]
    Connect(String),
    /// Service discovery failed.
    #[error("discover: {0}")]
    Discover(String),
    /// The event or notification stream could not be created (bus trouble).
    #[error("streams: {0}")]
    Streams(String),
}

/// One connection to a device through btleplug.
pub struct BleLink {
    peripheral: Peripheral,
    id: PeripheralId,
    chars: HashMap<u16, Characteristic>,
    values: Values,
    events: Events,
    op_timeout: Duration,
    quirks: Quirks,
    closed: bool,
    /// The device disconnected: values still arriving are handed out until the stream is quiet.
    draining: bool,
}

impl std::fmt::Debug for BleLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BleLink")
            .field("id", &self.id)
            .field("chars", &self.chars.keys().collect::<Vec<_>>())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl BleLink {
    /// Connects to `peripheral` on `adapter`, discovers its services, and receives its values from the
    /// adapter's feeds.
    ///
    /// # Errors
    /// [`OpenError`]; the device is disconnected again when discovery fails.
    pub async fn open(
        adapter: &SelectedAdapter,
        peripheral: Peripheral,
        op_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<BleLink, OpenError> {
        // Streams dropped elsewhere (an adapter's feeds, a caller's own) can still hit bluez-async's
        // clean-up race: count those (upstream.rs).
        super::upstream::contain();
        let feeds: &Feeds = &adapter.feeds;
        // Events first: a disconnect during the set-up must not be missed.
        let events = feeds.connections().await.map_err(OpenError::Streams)?;
        // Values before anything is subscribed; from the peripheral the device's stream resolves them with.
        let Attached { peripheral, values } = feeds
            .attach(peripheral, op_timeout)
            .await
            .map_err(OpenError::Streams)?;
        match tokio::time::timeout(connect_timeout, feeds.connect(&peripheral)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(OpenError::Connect(e)),
            Err(_) => {
                let _ = tokio::time::timeout(op_timeout, peripheral.disconnect()).await;
                return Err(OpenError::Connect("timed out".into()));
            }
        }
        let discovered = tokio::time::timeout(op_timeout, peripheral.discover_services()).await;
        if let Some(e) = match discovered {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".into()),
        } {
            let _ = tokio::time::timeout(op_timeout, peripheral.disconnect()).await;
            return Err(OpenError::Discover(e));
        }
        let chars = peripheral
            .characteristics()
            .into_iter()
            .filter_map(|c| short_uuid(&c.uuid).map(|u| (u, c)))
            .collect();
        Ok(BleLink {
            id: peripheral.id(),
            peripheral,
            chars,
            values,
            events,
            op_timeout,
            quirks: Quirks::default(),
            closed: false,
            draining: false,
        })
    }

    /// Applies a device's quirks to the values it sends (see [`Quirks::normalize`]).
    pub fn set_quirks(&mut self, quirks: Quirks) {
        self.quirks = quirks;
    }

    fn characteristic(&self, uuid: u16) -> Result<&Characteristic, LinkError> {
        if self.closed {
            return Err(LinkError::Disconnected);
        }
        self.chars.get(&uuid).ok_or(LinkError::Missing(uuid))
    }

    async fn timed<T>(
        &mut self,
        f: impl std::future::Future<Output = btleplug::Result<T>>,
    ) -> Result<T, LinkError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let mapped = link_error(&e);
                if mapped == LinkError::Disconnected {
                    self.closed = true;
                }
                tracing::debug!(device = %self.id, error = %e, ?mapped, "GATT operation failed");
                Err(mapped)
            }
            Err(_) => Err(LinkError::Timeout),
        }
    }

    /// After a disconnect: the next value still in the stream, waiting at most [`DRAIN_QUIET`] for one.
    async fn drain(&mut self) -> Option<Notification> {
        loop {
            match tokio::time::timeout(DRAIN_QUIET, self.values.recv()).await {
                Ok(Some(v)) => {
                    let Some(uuid) = short_uuid(&v.uuid) else {
                        continue;
                    };
                    let value = self.quirks.normalize(uuid, v.value);
                    return Some(Notification { uuid, value });
                }
                Ok(None) | Err(_) => {
                    self.draining = false;
                    return None;
                }
            }
        }
    }

    /// Whether BlueZ still has the device connected (not answering in time counts as no).
    async fn still_connected(&self) -> bool {
        matches!(
            tokio::time::timeout(self.op_timeout, self.peripheral.is_connected()).await,
            Ok(Ok(true))
        )
    }

    /// The RSSI BlueZ last reported, if any.
    pub async fn rssi(&self) -> Option<i16> {
        self.peripheral.properties().await.ok().flatten()?.rssi
    }
}

impl GattLink for BleLink {
    fn has(&self, uuid: u16) -> bool {
        self.chars.contains_key(&uuid)
    }

    async fn read(&mut self, uuid: u16) -> Result<Vec<u8>, LinkError> {
        let c = self.characteristic(uuid)?.clone();
        let p = self.peripheral.clone();
        self.timed(async move { p.read(&c).await }).await
    }

    async fn write(&mut self, uuid: u16, value: &[u8]) -> Result<(), LinkError> {
        let c = self.characteristic(uuid)?.clone();
        let p = self.peripheral.clone();
        self.timed(async move { p.write(&c, value, WriteType::WithResponse).await })
            .await
    }

    async fn subscribe(&mut self, uuid: u16) -> Result<(), LinkError> {
        let c = self.characteristic(uuid)?.clone();
        let p = self.peripheral.clone();
        self.timed(async move { p.subscribe(&c).await }).await
    }

    /// Cancel-safe: both channels' `recv()` are. Values already queued are handed out before a disconnect
    /// is reported (`biased`), so nothing the device sent before dropping the link is lost.
    async fn next_notification(&mut self) -> Option<Notification> {
        loop {
            if self.draining {
                return self.drain().await;
            }
            if self.closed {
                return None;
            }
            tokio::select! {
                biased;
                v = self.values.recv() => match v {
                    Some(v) => {
                        let Some(uuid) = short_uuid(&v.uuid) else { continue };
                        let value = self.quirks.normalize(uuid, v.value);
                        return Some(Notification { uuid, value });
                    }
                    None => {
                        self.closed = true;
                        return None;
                    }
                },
                e = self.events.recv() => {
                    let maybe_gone = match e {
                        Ok(CentralEvent::DeviceDisconnected(id)) => id == self.id,
                        Ok(_) => false,
                        // Fell behind the adapter's connection changes.
                        Err(RecvError::Lagged(_)) => true,
                        Err(RecvError::Closed) => {
                            self.closed = true;
                            return None;
                        }
                    };
                    // The adapter's events are shared and forwarded late under a flood: a disconnect
                    // may be the previous connection's. BlueZ's `Connected` says which.
                    if maybe_gone && !self.still_connected().await {
                        // The two streams are fed separately: values the device sent just before it
                        // dropped the link may still be on their way. Hand those out first.
                        self.draining = true;
                        self.closed = true;
                        return self.drain().await;
                    }
                }
            }
        }
    }

    async fn disconnect(&mut self) {
        self.closed = true;
        let _ = tokio::time::timeout(self.op_timeout, self.peripheral.disconnect()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bluetoothd's answers for ATT errors (gatt-client.c `create_gatt_dbus_error`) map back to the codes
    /// the collector acts on.
    #[test]
    fn bluez_errors_map_to_att_codes() {
        assert_eq!(
            dbus_error(
                "org.bluez.Error.Failed",
                "Operation failed with ATT error: 0x81"
            ),
            LinkError::Att(0x81)
        );
        assert_eq!(
            dbus_error(
                "org.bluez.Error.Failed",
                "Operation failed with ATT error: 0x80"
            ),
            LinkError::Att(0x80)
        );
        assert_eq!(
            dbus_error("org.bluez.Error.NotPermitted", "Not paired"),
            LinkError::Att(0x05)
        );
        assert_eq!(
            dbus_error("org.bluez.Error.NotPermitted", "Write not permitted"),
            LinkError::Att(0x03)
        );
        assert_eq!(
            dbus_error("org.bluez.Error.Failed", "Not connected"),
            LinkError::Disconnected
        );
        assert_eq!(
            dbus_error("org.freedesktop.DBus.Error.NoReply", "timeout"),
            LinkError::Disconnected
        );
    }

    #[test]
    fn short_uuids_only_for_the_sig_base() {
        let u = btleplug::api::bleuuid::uuid_from_u16(0x2A52);
        assert_eq!(short_uuid(&u), Some(0x2A52));
        let vendor = uuid::Uuid::from_u128(0xecbe3980_c9a2_11e1_b1bd_0002a5d5c51b);
        assert_eq!(short_uuid(&vendor), None);
    }
}
