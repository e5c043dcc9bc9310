//! Containment of a known panic inside bluez-async (btleplug's BlueZ backend), so that it is counted and
//! logged instead of printed as a crash.
//!
//! # The cause
//!
//! bluez-async 0.9.0 `MessageStream` (src/messagestream.rs:36-41, unchanged upstream at the time of
//! writing) removes its D-Bus match when dropped, from a spawned task:
//! `tokio::spawn(async move { connection.remove_match(token).await.unwrap() })`. The stream's channel
//! receiver is dropped at once, the task runs later. dbus-rs 0.9 feeds the match through a callback that
//! returns `sender.unbounded_send(msg).is_ok()` (`MsgMatch::msg_stream`, nonblock.rs:440-445), and a
//! callback returning `false` has its match removed on the spot. So when a signal the match covers
//! arrives between the drop and the task — a device's `PropertiesChanged` (RSSI while scanning, the
//! `Connected=false` of the very disconnect that ended the session) — the match is already gone when the
//! task asks for it, `remove_match` fails with "No match with that id found" (nonblock.rs:299) and the
//! `unwrap` panics in a runtime worker. Tokio catches the panic (the task's handle is dropped), so the
//! gateway lives on; nothing it relies on was in that task. Any btleplug `events()` or `notifications()`
//! stream dropped while its objects' properties change can hit it, and so can `Peripheral::connect()`,
//! which opens and drops one inside (bluez-async lib.rs:700-726). No upstream issue was found for it in
//! bluez-rs/bluez-async or deviceplug/btleplug (searched for the message, `remove_match` and the file);
//! the report to file is this paragraph.
//!
//! The side effect that matters: the bus-side rule of such a match is never removed (`RemoveMatch` is not
//! sent), so each occurrence leaves one match rule registered on the system bus for the gateway's
//! connection until the connection closes, and the system bus allows 512 per connection by default.
//! The gateway therefore does not open and drop streams per session: [`super::feeds`] keeps one adapter
//! stream and one stream per device for as long as the adapter is in use, and connects without
//! btleplug's `connect()`, and an adapter lost and found again gets the streams it had. What still
//! drops streams is stopping the source or replacing its bus connection. The counter below is how an
//! operator sees any occurrence.
//!
//! # The containment
//!
//! [`contain`] installs (once) a panic hook in front of the existing one: a panic raised at bluez-async's
//! `messagestream.rs` with that message is counted ([`contained_panics`], exported as
//! `phg_ble_dependency_panics_total`) and logged as one WARN line (no payload, no device value); every
//! other panic goes to the previous hook unchanged.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

static CONTAINED: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// How many bluez-async match clean-up panics were contained since the process started.
pub fn contained_panics() -> u64 {
    CONTAINED.load(Ordering::Relaxed)
}

/// Installs the panic hook described in the module doc; later calls do nothing.
pub fn contain() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map_or("", |l| l.file());
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if is_match_cleanup_race(file, message) {
                let n = CONTAINED.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    contained = n,
                    "bluez-async: a D-Bus match was gone before its stream's clean-up task ran (known upstream race in MessageStream::drop); the panic in that task is contained, one bus match rule stays registered"
                );
            } else {
                previous(info);
            }
        }));
    });
}

/// Whether a panic at `file` with `message` is bluez-async's match clean-up race (see the module doc).
fn is_match_cleanup_race(file: &str, message: &str) -> bool {
    let file = file.replace('\\', "/");
    file.contains("bluez-async")
        && file.ends_with("src/messagestream.rs")
        && message.contains("No match with that id found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_known_race_is_contained() {
        let msg = "called `Result::unwrap()` on an `Err` value: D-Bus error: No match with that id found (org.freedesktop.DBus.Error.Failed)";
        let file = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bluez-async-0.9.0/src/messagestream.rs";
        assert!(is_match_cleanup_race(file, msg));
        assert!(!is_match_cleanup_race(file, "another failure"));
        assert!(!is_match_cleanup_race("gateway/src/main.rs", msg));
    }
}
