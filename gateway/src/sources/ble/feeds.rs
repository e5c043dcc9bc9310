//! One btleplug event stream per adapter and one notification stream per device, opened once and kept
//! for as long as the adapter is in use, fanned out in-process to the scanner and the sessions.
//!
//! # Why sessions must not open their own streams
//!
//! In btleplug's BlueZ backend every `Central::events()` (btleplug 0.13.5 `src/bluez/adapter.rs:58`) and
//! every `Peripheral::notifications()` (`src/bluez/peripheral.rs:278`) goes to bluez-async 0.9.0
//! `filtered_event_stream` (`src/lib.rs:911-923`), which registers D-Bus matches (`add_match`: two for an
//! adapter — `InterfacesAdded` and `PropertiesChanged` under the adapter's path, `src/events.rs:96-125` —
//! one for a device) and wraps each in a `MessageStream`. Dropping one removes its match from a spawned
//! task (`src/messagestream.rs:36-41`); when a signal the match covers arrives between the drop and that
//! task, dbus-rs has already forgotten the match and never sends `RemoveMatch`, so the rule stays
//! registered on the bus for the life of the connection and the task panics (the race is described in
//! [`super::upstream`], which counts the panics). The bus allows 512 rules per connection by default: a
//! gateway that opened and dropped streams in every session would, with a busy radio, one day be refused
//! new matches and every session would fail.
//!
//! `Peripheral::connect()` does the same inside: bluez-async `connect_with_timeout` (`src/lib.rs:754-761`)
//! waits for `ServicesResolved` on a device stream of its own (`await_service_discovery`,
//! `src/lib.rs:700-726`) and drops it the moment the property turns true, while the device is busiest.
//! So [`Feeds::connect`] calls `Device1.Connect` itself (on the gateway's own connection, [`super::bus`]) and reads
//! `ServicesResolved` until it is true: method calls only, no match.
//!
//! # What is kept instead
//!
//! - The adapter's event stream, opened by the first subscriber (the scanner, so it also gets btleplug's
//!   synthesised `DeviceDiscovered` for devices BlueZ already knows) and forwarded by one task into two
//!   tokio broadcast channels: every event (the scanner; a scanner that falls behind skips
//!   advertisements, which repeat) and only `DeviceConnected` / `DeviceDisconnected` (the links, so a
//!   flood of RSSI updates cannot push a disconnect out of their queue).
//! - Per device, one `notifications()` stream, opened at the device's first session and kept across its
//!   connections (btleplug documents the stream as valid across re-connections: deviceplug/btleplug#203),
//!   with the `Peripheral` it was opened on: btleplug resolves a value's characteristic through that
//!   peripheral's service table, so every session with the device uses that same peripheral (its
//!   `discover_services` refreshes the table the stream reads). Values go to the one link attached at the
//!   time over an unbounded channel, as btleplug's own stream does: none is dropped for a slow reader.
//!   What a kept stream adds is values that outlive their connection; [`Feeds::attach`] drops those, and
//!   a link confirms a `DeviceDisconnected` with BlueZ before it believes it (it may be the last
//!   connection's, forwarded late).
//!
//! The streams are dropped only when the [`Feeds`] is: when the source stops, or when its bus connection
//! is replaced. An adapter that is lost and comes back under the same name gets its kept [`Feeds`] again
//! (`super::run`), so the rules are bounded by the adapters and devices ever seen, not by sessions or
//! losses.
//!
//! No upstream report of the race was found in bluez-rs/bluez-async or deviceplug/btleplug (searched for
//! the panic message, `remove_match` and `MessageStream`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use btleplug::api::{Central as _, CentralEvent, Peripheral as _, ValueNotification};
use btleplug::platform::{Adapter, Peripheral, PeripheralId};
use dbus::nonblock::stdintf::org_freedesktop_dbus::Properties as _;
use futures_util::{FutureExt as _, Stream, StreamExt};
use tokio::sync::{Mutex, OnceCell, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Events a scanner may fall behind by before it skips some (they are advertisements; they repeat).
const EVENTS_CAPACITY: usize = 1024;
/// Connection changes a link may fall behind by; a link that does checks the device's state instead.
const CONNECTIONS_CAPACITY: usize = 64;
/// libdbus's reply timeout for `Device1.Connect` (bluetoothd's own page timeout is shorter).
const CONNECT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `ServicesResolved` is read after `Device1.Connect` returned.
const RESOLVED_POLL: Duration = Duration::from_millis(20);

/// The adapter's streams and the bus connection sessions connect through; see the module doc.
pub struct Feeds {
    adapter: Adapter,
    /// BlueZ's name of the adapter (`hci0`), for device object paths.
    adapter_name: String,
    events: Arc<Mutex<Option<EventFeed>>>,
    devices: Mutex<HashMap<PeripheralId, DeviceFeed>>,
    bus: OnceCell<super::bus::Bus>,
}

impl std::fmt::Debug for Feeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feeds")
            .field("adapter", &self.adapter_name)
            .finish_non_exhaustive()
    }
}

/// The adapter's event stream, while its forwarding task runs.
struct EventFeed {
    all: broadcast::Sender<CentralEvent>,
    connections: broadcast::Sender<CentralEvent>,
    task: JoinHandle<()>,
}

/// A device's notification stream, while its forwarding task runs.
struct DeviceFeed {
    peripheral: Peripheral,
    /// A new link's channel, for the task to send values to from then on (it acknowledges).
    attach: mpsc::UnboundedSender<(
        mpsc::UnboundedSender<ValueNotification>,
        oneshot::Sender<()>,
    )>,
    task: JoinHandle<()>,
}

/// Forwards `stream` to the link attached last; see [`Feeds::attach`] for what an attachment drops.
async fn forward_values(
    mut stream: Pin<Box<dyn Stream<Item = ValueNotification> + Send>>,
    mut attach: mpsc::UnboundedReceiver<(
        mpsc::UnboundedSender<ValueNotification>,
        oneshot::Sender<()>,
    )>,
) {
    let mut to: Option<mpsc::UnboundedSender<ValueNotification>> = None;
    loop {
        tokio::select! {
            biased;
            a = attach.recv() => {
                let Some((tx, done)) = a else { return };
                // What the stream holds now arrived before the caller's barrier: an earlier connection's
                // values (its link is gone). btleplug's mapping is synchronous, so all of it is ready.
                let mut stale = 0u32;
                while let Some(Some(_)) = stream.next().now_or_never() {
                    stale += 1;
                }
                if stale > 0 {
                    tracing::debug!(stale, "values of an earlier connection dropped");
                }
                to = Some(tx);
                let _ = done.send(());
            }
            v = stream.next() => {
                let Some(v) = v else {
                    // The stream ended (the bus connection is gone): the attached link sees the end.
                    return;
                };
                if to.as_ref().is_some_and(|tx| tx.send(v).is_err()) {
                    to = None;
                }
            }
        }
    }
}

/// What a link gets from [`Feeds::attach`].
#[derive(Debug)]
pub struct Attached {
    /// The device's peripheral, the one its notification stream resolves values with.
    pub peripheral: Peripheral,
    /// The device's values from now on.
    pub values: mpsc::UnboundedReceiver<ValueNotification>,
}

impl Feeds {
    /// Feeds for `adapter` (named `adapter_name` by BlueZ); nothing is opened before it is asked for.
    pub fn new(adapter: Adapter, adapter_name: String) -> Feeds {
        Feeds {
            adapter,
            adapter_name,
            events: Arc::default(),
            devices: Mutex::default(),
            bus: OnceCell::new(),
        }
    }

    /// Every adapter event from now on (the first subscriber also gets the devices BlueZ already knows).
    ///
    /// # Errors
    /// The stream could not be opened (bus trouble); the next call tries again.
    pub async fn events(&self) -> Result<broadcast::Receiver<CentralEvent>, String> {
        let mut feed = self.events.lock().await;
        if let Some(f) = feed.as_ref() {
            return Ok(f.all.subscribe());
        }
        let f = self.open_events().await?;
        let rx = f.all.subscribe();
        *feed = Some(f);
        Ok(rx)
    }

    /// `DeviceConnected` and `DeviceDisconnected` of every device from now on.
    ///
    /// # Errors
    /// As [`Feeds::events`].
    pub async fn connections(&self) -> Result<broadcast::Receiver<CentralEvent>, String> {
        let mut feed = self.events.lock().await;
        if let Some(f) = feed.as_ref() {
            return Ok(f.connections.subscribe());
        }
        let f = self.open_events().await?;
        let rx = f.connections.subscribe();
        *feed = Some(f);
        Ok(rx)
    }

    /// Opens the adapter's stream and starts forwarding it. Called with `self.events` locked.
    async fn open_events(&self) -> Result<EventFeed, String> {
        let mut stream = self.adapter.events().await.map_err(|e| e.to_string())?;
        let (all, _) = broadcast::channel(EVENTS_CAPACITY);
        let (connections, _) = broadcast::channel(CONNECTIONS_CAPACITY);
        let (all_tx, connections_tx) = (all.clone(), connections.clone());
        let feed = Arc::downgrade(&self.events);
        let task = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                if matches!(
                    event,
                    CentralEvent::DeviceConnected(_) | CentralEvent::DeviceDisconnected(_)
                ) {
                    // No receiver is not an error: nobody is connected.
                    let _ = connections_tx.send(event.clone());
                }
                let _ = all_tx.send(event);
            }
            // The stream ended (the bus connection is gone): let the next subscriber open a new one,
            // and this one's receivers see the end once the senders are dropped.
            tracing::warn!("the Bluetooth adapter's event stream ended");
            if let Some(feed) = feed.upgrade() {
                let mut feed = feed.lock().await;
                if feed.as_ref().is_some_and(|f| f.all.same_channel(&all_tx)) {
                    *feed = None;
                }
            }
        });
        Ok(EventFeed {
            all,
            connections,
            task,
        })
    }

    /// Attaches a link to `peripheral`'s values, opening the device's notification stream the first time
    /// (before anything is subscribed: btleplug does not buffer values nobody listens for). A link
    /// attached earlier to the same device stops receiving (its channel ends).
    ///
    /// The stream outlives connections, so values of the device's previous connection may still be on
    /// their way (a transfer aborted by the session, then the link dropped). They must not reach the new
    /// link: a D-Bus call to bluetoothd on btleplug's connection first (its reply comes after every signal
    /// bluetoothd sent before it, and dbus-rs dispatches in order), then the forwarding task drops what
    /// its stream holds before it sends to the new link.
    ///
    /// # Errors
    /// The stream could not be opened, or bluetoothd did not answer within `timeout`.
    pub async fn attach(
        &self,
        peripheral: Peripheral,
        timeout: Duration,
    ) -> Result<Attached, String> {
        let id = peripheral.id();
        let (attach, peripheral) = {
            let mut devices = self.devices.lock().await;
            let feed = match devices.get(&id) {
                Some(f) if !f.task.is_finished() => f,
                _ => {
                    let stream = peripheral
                        .notifications()
                        .await
                        .map_err(|e| e.to_string())?;
                    let (attach, requests) = mpsc::unbounded_channel();
                    let feed = DeviceFeed {
                        peripheral,
                        attach,
                        task: tokio::spawn(forward_values(stream, requests)),
                    };
                    if let Some(old) = devices.insert(id.clone(), feed) {
                        old.task.abort();
                    }
                    devices
                        .get(&id)
                        .ok_or_else(|| "device feed vanished".to_owned())?
                }
            };
            (feed.attach.clone(), feed.peripheral.clone())
        };
        // The barrier; its answer (an error for a device BlueZ forgot, too) is not the point.
        tokio::time::timeout(timeout, peripheral.is_connected())
            .await
            .map_err(|_| "bluetoothd not answering".to_owned())?
            .ok();
        let (tx, values) = mpsc::unbounded_channel();
        let (done, attached) = oneshot::channel();
        attach
            .send((tx, done))
            .map_err(|_| "device feed ended".to_owned())?;
        attached.await.map_err(|_| "device feed ended".to_owned())?;
        Ok(Attached { peripheral, values })
    }

    /// `Device1.Connect`, then `ServicesResolved` read until true — what btleplug's `connect()` does,
    /// without the device stream it opens and drops (module doc). The caller bounds the time.
    ///
    /// # Errors
    /// BlueZ's error for `Connect`, or bus trouble.
    pub async fn connect(&self, peripheral: &Peripheral) -> Result<(), String> {
        let bus = self
            .bus
            .get_or_try_init(|| async { super::bus::Bus::system() })
            .await
            .map_err(|e| format!("D-Bus: {e}"))?;
        let path =
            super::pairing::device_path(&self.adapter_name, &peripheral.address().to_string());
        // The caller bounds the whole; libdbus's reply timeout only has to be long enough.
        let device = bus.bluez(&path, CONNECT_CALL_TIMEOUT);
        device
            .method_call::<(), _, _, _>("org.bluez.Device1", "Connect", ())
            .await
            .map_err(|e| super::bus::describe(&e))?;
        loop {
            let resolved: bool = device
                .get("org.bluez.Device1", "ServicesResolved")
                .await
                .map_err(|e| format!("ServicesResolved: {}", super::bus::describe(&e)))?;
            if resolved {
                return Ok(());
            }
            tokio::time::sleep(RESOLVED_POLL).await;
        }
    }
}

impl Drop for Feeds {
    fn drop(&mut self) {
        if let Some(f) = self.events.try_lock().ok().and_then(|mut f| f.take()) {
            f.task.abort();
        }
        for f in self.devices.get_mut().values() {
            f.task.abort();
        }
    }
}
