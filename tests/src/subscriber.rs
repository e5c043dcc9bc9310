//! An MQTT subscriber that collects what a topic filter receives (rumqttc, MQTT 3.1.1, QoS 1).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The retain flag as delivered (set for a retained message sent on subscribe).
    pub retain: bool,
}

/// Collects every message on a topic filter. Keeps polling (and reconnecting every 100 ms) across
/// broker restarts until dropped.
#[derive(Debug)]
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<Received>,
    received: Vec<Received>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// A clean-session subscriber; returns once the SUBACK arrived (so later publishes reach it).
    ///
    /// # Errors
    ///
    /// No SUBACK within 10 s.
    pub async fn connect(broker: SocketAddr, filter: &str) -> io::Result<Self> {
        Self::start(broker, filter, unique_id("sub"), true).await
    }

    /// A persistent-session subscriber (`clean_session = false`) with a fixed client id: the broker
    /// queues its messages while it is away, and (Mosquitto with persistence) across a clean broker
    /// restart.
    ///
    /// # Errors
    ///
    /// No SUBACK within 10 s.
    pub async fn connect_persistent(
        broker: SocketAddr,
        filter: &str,
        client_id: &str,
    ) -> io::Result<Self> {
        Self::start(broker, filter, client_id.to_owned(), false).await
    }

    async fn start(
        broker: SocketAddr,
        filter: &str,
        client_id: String,
        clean: bool,
    ) -> io::Result<Self> {
        let mut opts = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
        opts.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (suback_tx, mut suback_rx) = mpsc::unbounded_channel();
        let (msg_tx, rx) = mpsc::unbounded_channel();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        // A new session has no subscription; a resumed one keeps it.
                        if !ack.session_present {
                            let _ = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = msg_tx.send(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        if !matches!(timeout_at(deadline, suback_rx.recv()).await, Ok(Some(()))) {
            task.abort();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no SUBACK within 10 s",
            ));
        }
        Ok(Self {
            rx,
            received: Vec::new(),
            task,
        })
    }

    /// Waits until `n` messages in total were received or `timeout` passed; returns all received so far.
    pub async fn wait_for(&mut self, n: usize, timeout: Duration) -> &[Received] {
        let deadline = Instant::now() + timeout;
        while self.received.len() < n {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => self.received.push(m),
                Ok(None) | Err(_) => break,
            }
        }
        self.drain();
        &self.received
    }

    /// Collects for `period` and returns all received so far (to see that nothing more arrives).
    pub async fn collect_for(&mut self, period: Duration) -> &[Received] {
        let deadline = Instant::now() + period;
        while let Ok(Some(m)) = timeout_at(deadline, self.rx.recv()).await {
            self.received.push(m);
        }
        &self.received
    }

    /// Everything received so far (without waiting).
    pub fn received(&mut self) -> &[Received] {
        self.drain();
        &self.received
    }

    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.received.push(m);
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client id unique within this machine and run.
pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
