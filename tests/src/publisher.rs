//! An MQTT publisher that knows when the broker has each message (rumqttc, MQTT 3.1.1, QoS 1): a test
//! that publishes "while ingest is down" or "before the good reading" needs the broker to hold it first.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

use crate::unique_id;

/// A clean-session QoS 1 publisher. Stops polling when dropped.
#[derive(Debug)]
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    sent: usize,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Connects to `broker` (it may send messages up to MQTT's own size limit).
    pub fn connect(broker: SocketAddr) -> Publisher {
        let mut opts = MqttOptions::new(unique_id("pub"), broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 28, 1 << 28);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let acked = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&acked);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            sent: 0,
            task,
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK (messages are acknowledged in order).
    ///
    /// # Errors
    ///
    /// No PUBACK within `timeout` (a broker refuses a message over its size limit this way).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> io::Result<()> {
        self.publish_all(topic, [payload], timeout).await
    }

    /// Publishes every payload at QoS 1, then waits once for the broker's PUBACKs of all of them (rumqttc's
    /// in-flight window paces the sending): a backlog of hundreds in a second, not one poll interval each.
    ///
    /// # Errors
    ///
    /// Not every PUBACK within `timeout` of the last publish.
    pub async fn publish_all<P: Into<Vec<u8>>>(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = P>,
        timeout: Duration,
    ) -> io::Result<()> {
        for payload in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.into())
                .await
                .map_err(io::Error::other)?;
            self.sent += 1;
        }
        let want = self.sent;
        let acked = Arc::clone(&self.acked);
        let ok = crate::until(timeout, async || acked.load(Ordering::SeqCst) >= want).await;
        if ok {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} of {want} PUBACKs on {topic} within {timeout:?}",
                    acked.load(Ordering::SeqCst)
                ),
            ))
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
