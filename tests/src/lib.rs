//! Support for the end-to-end scenarios in `tests/tests/`: real brokers, a subscriber that records what
//! arrives, and journals full of synthetic readings whose delivery can be checked.
//!
//! - [`TestBroker`] — Mosquitto when installed (stoppable, restartable on the same port), else the
//!   gateway's embedded rumqttd; it prints which one a test runs against.
//! - [`Subscriber`] — an MQTT 3.1.1 QoS 1 subscriber on a topic filter, with
//!   [`wait_for`](Subscriber::wait_for).
//! - [`browser`] — headless Chromium over WebDriver, and a scripted kiosk for the kiosk's web server.
//! - [`readings`] — readings with checkable ids, a spawned uplink, and the delivery analysis
//!   ([`Delivery`]: complete, in order per device, duplicates identical).

pub mod bluez;
mod broker;
pub mod browser;
pub mod process;
mod publisher;
pub mod readings;
mod subscriber;

pub use broker::{BrokerKind, TestBroker, free_loopback_port, mosquitto_path};
pub use publisher::Publisher;
pub use readings::{Delivery, RunningUplink};
pub use subscriber::{Received, Subscriber, unique_id};

/// Routes `tracing` output to the test harness when `RUST_LOG` is set (e.g. `RUST_LOG=gateway=debug`);
/// silent otherwise. Safe to call from every test.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Polls `f` every 100 ms until it is true (`true`) or `timeout` has passed (`false`).
pub async fn until(timeout: std::time::Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
