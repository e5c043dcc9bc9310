//! An MQTT broker inside the gateway process (rumqttd), for `gateway demo` and for tests on machines
//! without Mosquitto.
//!
//! rumqttd 0.20 has neither a bound-port API nor a shutdown: [`Broker::start`](rumqttd::Broker::start)
//! blocks its thread forever and a listener that fails to bind only logs. So:
//! - a port 0 is resolved here first (bind `127.0.0.1:0`, read the port, drop the listener), then given
//!   to rumqttd — a tiny window in which another process could take the port; [`EmbeddedBroker::start`]
//!   then fails with [`BrokerError::NotReady`] rather than hang;
//! - the broker runs on its own thread and is ready once a TCP connect succeeds;
//! - it lives until the process exits (dropping [`EmbeddedBroker`] does not stop it).
//!
//! It listens on loopback only and has no authentication or TLS: the embedded broker is a stand-in, not
//! something to expose (DESIGN promise 8). Production points the uplink at the CRM's broker.
//!
//! Protocol versions: [`EmbeddedBroker::start`] runs an MQTT 3.1.1 listener, which is what the gateway
//! uses against it (`MqttVersion::V311`). An MQTT 5 listener can be added ([`BrokerListeners::v5`]), but
//! rumqttd 0.20's MQTT 5 support is not reliable enough to be the default: measured here, a QoS 1 publish
//! with MQTT 5 properties (the uplink's `content-type`) forwarded to a 3.1.1 subscriber panics the 3.1.1
//! listener thread (`unreachable!` in rumqttd's `protocol/v4/mod.rs`) and poisons a mutex, after which
//! every new 3.1.1 connection panics too. MQTT 5 clients among themselves worked (publish, PUBACK,
//! retained status, last will, content type). So: 3.1.1 only, or 5 only — never both with
//! cross-version traffic. The tests prefer Mosquitto for this reason.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::info;

/// How long [`EmbeddedBroker::start`] waits for the listeners to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A listen address is not loopback: the embedded broker has no authentication or TLS.
    #[error("embedded broker: {0} is not a loopback address (it has no authentication or TLS)")]
    NotLoopback(SocketAddr),
    /// No listener was asked for.
    #[error("embedded broker: no listener configured")]
    NoListener,
    /// Picking a free port failed.
    #[error("embedded broker: cannot reserve a port on {addr}: {source}")]
    Reserve {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The broker thread could not be spawned.
    #[error("embedded broker: cannot spawn its thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The listener did not accept a connection in time (port taken, or rumqttd failed; see its log).
    #[error("embedded broker: {0} did not accept connections within {READY_TIMEOUT:?}")]
    NotReady(SocketAddr),
}

/// Which listeners to start. A port 0 means "pick a free one".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerListeners {
    /// MQTT 3.1.1.
    pub v4: Option<SocketAddr>,
    /// MQTT 5 (see the module doc: do not mix with 3.1.1 clients on the same topics).
    pub v5: Option<SocketAddr>,
}

/// A running in-process rumqttd (see the module doc: it runs until the process exits).
#[derive(Debug)]
pub struct EmbeddedBroker {
    v4: Option<SocketAddr>,
    v5: Option<SocketAddr>,
    _thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts an MQTT 3.1.1 listener on `bind` (loopback; port 0 picks a free port) and waits until it
    /// accepts connections.
    ///
    /// # Errors
    ///
    /// [`BrokerError`]: a non-loopback address, no free port, or a listener that never came up.
    pub fn start(bind: SocketAddr) -> Result<Self, BrokerError> {
        Self::start_with(BrokerListeners {
            v4: Some(bind),
            v5: None,
        })
    }

    /// Starts the given listeners and waits until each accepts connections.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with(listeners: BrokerListeners) -> Result<Self, BrokerError> {
        if listeners.v4.is_none() && listeners.v5.is_none() {
            return Err(BrokerError::NoListener);
        }
        let v4 = listeners.v4.map(reserve).transpose()?;
        let v5 = listeners.v5.map(reserve).transpose()?;

        let mut config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 1024,
                max_outgoing_packet_count: 200,
                max_segment_size: 16 << 20,
                max_segment_count: 4,
                ..Default::default()
            },
            ..Default::default()
        };
        if let Some(addr) = v4 {
            config.v4 = Some([("v4".to_owned(), server_settings("v4", addr))].into());
        }
        if let Some(addr) = v5 {
            config.v5 = Some([("v5".to_owned(), server_settings("v5", addr))].into());
        }

        let thread = thread::Builder::new()
            .name("embedded-broker".to_owned())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                // Blocks for as long as the listeners run (forever, normally).
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Spawn)?;

        for addr in v4.iter().chain(v5.iter()) {
            wait_until_accepting(*addr)?;
        }
        info!(v4 = ?v4, v5 = ?v5, "embedded MQTT broker (rumqttd) listening");
        Ok(Self {
            v4,
            v5,
            _thread: thread,
        })
    }

    /// The MQTT 3.1.1 listener's address, if started.
    pub fn v4_addr(&self) -> Option<SocketAddr> {
        self.v4
    }

    /// The MQTT 5 listener's address, if started.
    pub fn v5_addr(&self) -> Option<SocketAddr> {
        self.v5
    }

    /// `mqtt://host:port` of the MQTT 3.1.1 listener (or the MQTT 5 one if that is the only one).
    pub fn url(&self) -> String {
        let addr = self
            .v4
            .or(self.v5)
            .map(|a| a.to_string())
            .unwrap_or_default();
        format!("mqtt://{addr}")
    }
}

fn server_settings(name: &str, listen: SocketAddr) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            // Above the journal's 1 MiB record cap, like the uplink's own packet limit.
            max_payload_size: 2 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Checks the address is loopback and resolves port 0 to a free port.
fn reserve(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if !addr.ip().is_loopback() {
        return Err(BrokerError::NotLoopback(addr));
    }
    if addr.port() != 0 {
        return Ok(addr);
    }
    // rumqttd cannot report the port it bound: take one now and hand it over.
    let listener =
        TcpListener::bind(addr).map_err(|source| BrokerError::Reserve { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| BrokerError::Reserve { addr, source })
}

fn wait_until_accepting(addr: SocketAddr) -> Result<(), BrokerError> {
    let start = Instant::now();
    while start.elapsed() < READY_TIMEOUT {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(10));
    }
    Err(BrokerError::NotReady(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_broker_refuses_non_loopback_and_empty_config() {
        let err = EmbeddedBroker::start("0.0.0.0:0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, BrokerError::NotLoopback(_)), "{err}");
        let err = EmbeddedBroker::start_with(BrokerListeners { v4: None, v5: None }).unwrap_err();
        assert!(matches!(err, BrokerError::NoListener));
    }

    #[test]
    fn embedded_broker_starts_on_a_free_loopback_port() {
        let b = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = b.v4_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(b.url().starts_with("mqtt://127.0.0.1:"));
        TcpStream::connect(addr).unwrap();
    }
}
