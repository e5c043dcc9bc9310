//! One face for rumqttc's two clients (MQTT 3.1.1 in the crate root, MQTT 5 in `rumqttc::v5`), reduced
//! to what the uplink needs: hand a publish over, poll for the few events that matter, and throw the
//! session state away after a connection loss.
//!
//! What rumqttc 0.25's source shows, and this module relies on:
//! - `EventLoop::poll` reconnects by itself when `network` is `None`; on an error inside a connection it
//!   calls `clean()`, which moves unacked publishes from `MqttState` *and* requests still in the channel
//!   into the public `pending` queue for retransmission. [`Driver::reset`] empties `pending` and replaces
//!   `state`: the journal decides what is resent, so nothing stale can produce an `Outgoing::Publish`
//!   event that the FIFO correlation would pin on the wrong record.
//! - `MqttState::clean()` does not clear a held packet-id collision; a fresh `MqttState` does.
//! - `Network::readb` may have queued events (PUBACKs among them) in `state.events` before the read
//!   that failed; [`Driver::reset`] hands those back so that acks the broker did send are not wasted.
//! - `poll` is not safe to cancel in the middle of a write (the request is taken off the channel before
//!   the bytes are queued), so the uplink keeps one `poll` future alive until it completes.
//! - The MQTT 5 client caps its window at the broker's CONNACK `receive_maximum`; requests beyond it wait
//!   in the channel, in order, which keeps the correlation valid.
//! - An MQTT 5 PUBACK with a failure reason code still frees the packet id and is reported as a normal
//!   `Incoming::PubAck`: the reason must be checked here.

use std::fmt;

use rumqttc::v5::mqttbytes::v5 as mqtt5;

use super::config::{CheckedUplinkConfig, MqttVersion};

/// The largest publish handed to the broker: above the journal's 1 MiB record cap, so a record the
/// journal accepted is never refused here (that would wedge it in a reconnect loop).
const MAX_OUTGOING_PACKET: usize = 2 * 1024 * 1024;
/// The MQTT 5 content type of every payload (DESIGN: "MQTT 5 carries content-type").
pub(crate) const CONTENT_TYPE: &str = "application/json";

/// An event from the event loop, reduced to what the uplink acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Signal {
    /// A message on a subscribed topic (the CRM's configuration).
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A session was established.
    ConnAck,
    /// `Outgoing::Publish(pkid)`: the oldest handed-over publish was written with this packet id.
    Sent(u16),
    /// A PUBACK that accepts the publish.
    Acked(u16),
    /// An MQTT 5 PUBACK with a failure reason code: the broker did not take the message.
    Refused {
        /// The packet id.
        pkid: u16,
        /// The reason code, for the log.
        reason: String,
    },
    /// Our DISCONNECT was written.
    Disconnected,
    /// Anything else (pings, acks we send, collisions' `AwaitAck`).
    Other,
}

/// A connection-level failure; the uplink logs it and reconnects.
#[derive(Debug)]
pub(crate) enum LinkError {
    V4(rumqttc::ConnectionError),
    V5(rumqttc::v5::ConnectionError),
}

impl LinkError {
    /// The size of an incoming packet that was over the configured maximum (the read stopped at its
    /// header; the connection is unusable after it), or `None` for any other failure.
    pub(crate) fn too_large(&self) -> Option<usize> {
        match self {
            Self::V4(rumqttc::ConnectionError::MqttState(
                rumqttc::StateError::Deserialization(rumqttc::Error::PayloadSizeLimitExceeded(n)),
            )) => Some(*n),
            Self::V5(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::Deserialization(
                    rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. },
                ),
            )) => Some(*pkt_size),
            _ => None,
        }
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(e) => write!(f, "{e}"),
            Self::V5(e) => write!(f, "{e}"),
        }
    }
}

/// Why a publish could not be handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandOver {
    /// The topic can never be published (empty, or has wildcards).
    InvalidTopic,
    /// The request channel is full (should not happen: it is sized above the window) or closed.
    ChannelFull,
}

/// The sending half: hands requests to the event loop through rumqttc's channel.
#[derive(Debug)]
pub(crate) enum Publisher {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The driving half: the event loop, polled by the uplink task only (STYLE practice 9).
pub(crate) enum Driver {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4(_) => "Driver::V4",
            Self::V5(_) => "Driver::V5",
        })
    }
}

/// rumqttc's own in-flight bound and packet-id range. Twice the uplink's window (plus the status
/// publishes): the uplink never has more than `inflight + 2` outstanding, so rumqttc's flow control
/// never holds a request, and the larger id range makes a collision (a broker acking out of order)
/// need an id to stay unacked while twice the window went by.
fn rumqttc_inflight(inflight: u16) -> u16 {
    inflight
        .saturating_add(2)
        .saturating_mul(2)
        .min(u16::MAX - 1)
}

/// Channel capacity: the window, the two status publishes and a DISCONNECT always fit, so a
/// `try_publish` within the window never fails for lack of room.
fn channel_capacity(inflight: u16) -> usize {
    usize::from(inflight) + 4
}

/// Builds the client pair for a checked configuration. Nothing is connected until the first poll.
pub(crate) fn build(cfg: &CheckedUplinkConfig) -> (Publisher, Driver) {
    let cap = channel_capacity(cfg.inflight);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(cfg.connect_timeout_secs);
    // Small QoS 1 publishes and their acks: Nagle plus delayed ACK would add tens of milliseconds.
    net.set_tcp_nodelay(true);

    match cfg.mqtt_version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_session(true)
                .set_inflight(rumqttc_inflight(cfg.inflight))
                // MQTT 3.1.1 cannot announce it; a larger packet fails the read (LinkError::too_large).
                .set_max_packet_size(cfg.max_packet_bytes as usize, MAX_OUTGOING_PACKET)
                .set_last_will(rumqttc::LastWill::new(
                    &cfg.status_topic,
                    cfg.offline_payload.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            if let Some(user) = &cfg.username {
                o.set_credentials(
                    user,
                    cfg.password.as_ref().map(|p| p.expose()).unwrap_or(""),
                );
            }
            if let Some(tls) = &cfg.tls {
                install_crypto_provider();
                o.set_transport(rumqttc::Transport::tls(
                    tls.ca.clone(),
                    tls.client_auth.clone(),
                    None,
                ));
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(o, cap);
            eventloop.set_network_options(net);
            (Publisher::V4(client), Driver::V4(Box::new(eventloop)))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
            let will = mqtt5::LastWill::new(
                &cfg.status_topic,
                cfg.offline_payload.clone(),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                Some(mqtt5::LastWillProperties {
                    delay_interval: None,
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: Some(CONTENT_TYPE.to_owned()),
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                }),
            );
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(rumqttc_inflight(cfg.inflight))
                // Announced in CONNECT (MQTT 5.0 §3.1.2.11.4): the broker drops a larger message for us
                // instead of sending it, so the connection never breaks on it.
                .set_max_packet_size(Some(cfg.max_packet_bytes))
                .set_connection_timeout(cfg.connect_timeout_secs)
                .set_network_options(net)
                .set_last_will(will);
            if let Some(user) = &cfg.username {
                o.set_credentials(
                    user,
                    cfg.password.as_ref().map(|p| p.expose()).unwrap_or(""),
                );
            }
            if let Some(tls) = &cfg.tls {
                install_crypto_provider();
                o.set_transport(rumqttc::Transport::tls(
                    tls.ca.clone(),
                    tls.client_auth.clone(),
                    None,
                ));
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, cap);
            (Publisher::V5(client), Driver::V5(Box::new(eventloop)))
        }
    }
}

impl Publisher {
    /// Asks for a QoS 1 subscription without waiting (see [`publish`](Self::publish)).
    pub(crate) fn subscribe(&self, topic: &str) -> Result<(), HandOver> {
        if topic.is_empty() || !rumqttc::valid_filter(topic) {
            return Err(HandOver::InvalidTopic);
        }
        match self {
            Self::V4(c) => c
                .try_subscribe(topic, rumqttc::QoS::AtLeastOnce)
                .map_err(|_| HandOver::ChannelFull),
            Self::V5(c) => c
                .try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|_| HandOver::ChannelFull),
        }
    }

    /// Hands a QoS 1 publish to the event loop without waiting (the uplink task is also the one that
    /// polls the event loop, so waiting for channel room here could deadlock).
    pub(crate) fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), HandOver> {
        // Checked here so that a bad topic is told apart from a full channel (rumqttc reports both as
        // `ClientError::TryRequest`).
        if topic.is_empty() || !rumqttc::valid_topic(topic) {
            return Err(HandOver::InvalidTopic);
        }
        match self {
            Self::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|_| HandOver::ChannelFull),
            Self::V5(c) => {
                let props = mqtt5::PublishProperties {
                    content_type: Some(CONTENT_TYPE.to_owned()),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                    props,
                )
                .map_err(|_| HandOver::ChannelFull)
            }
        }
    }

    /// Asks for a clean DISCONNECT (the broker then does not publish the last will).
    pub(crate) fn disconnect(&self) -> bool {
        match self {
            Self::V4(c) => c.try_disconnect().is_ok(),
            Self::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

impl Driver {
    /// Polls the event loop once (connecting first if there is no connection).
    ///
    /// Not to be cancelled mid-way except when the connection is being abandoned (see the module doc).
    pub(crate) async fn poll(&mut self) -> Result<Signal, LinkError> {
        match self {
            Self::V4(el) => el.poll().await.map(signal_v4).map_err(LinkError::V4),
            Self::V5(el) => el.poll().await.map(signal_v5).map_err(LinkError::V5),
        }
    }

    /// Drops the connection and every bit of rumqttc's session state: the retransmission queue, the
    /// requests still in the channel, in-flight packet ids, a held collision. Returns the events that
    /// were read from the broker but not yet yielded (PUBACKs of the connection that just ended, still
    /// valid for the correlation as it stood), in order.
    pub(crate) fn reset(&mut self, inflight: u16) -> Vec<Signal> {
        match self {
            Self::V4(el) => {
                let leftover: Vec<Signal> = el.state.events.drain(..).map(signal_v4).collect();
                // clean(): drop the network, drain the request channel into `pending`; then drop that.
                el.clean();
                el.pending.clear();
                el.state = rumqttc::MqttState::new(rumqttc_inflight(inflight), false);
                leftover
            }
            Self::V5(el) => {
                let leftover: Vec<Signal> = el.state.events.drain(..).map(signal_v5).collect();
                el.clean();
                el.pending.clear();
                el.state = rumqttc::v5::MqttState::new(rumqttc_inflight(inflight), false);
                leftover
            }
        }
    }
}

fn signal_v4(event: rumqttc::Event) -> Signal {
    use rumqttc::{Event, Outgoing, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => Signal::ConnAck,
        Event::Incoming(Packet::PubAck(ack)) => Signal::Acked(ack.pkid),
        Event::Incoming(Packet::Publish(p)) => Signal::Message {
            topic: p.topic,
            payload: p.payload.to_vec(),
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => Signal::Sent(pkid),
        Event::Outgoing(Outgoing::Disconnect) => Signal::Disconnected,
        _ => Signal::Other,
    }
}

fn signal_v5(event: rumqttc::v5::Event) -> Signal {
    use mqtt5::{Packet, PubAckReason};
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    match event {
        Event::Incoming(Packet::ConnAck(_)) => Signal::ConnAck,
        Event::Incoming(Packet::Publish(p)) => Signal::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
        },
        Event::Incoming(Packet::PubAck(ack)) => match ack.reason {
            // "No matching subscribers" is a success: the broker took the message (MQTT 5 §3.4.2.1).
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Signal::Acked(ack.pkid),
            reason => Signal::Refused {
                pkid: ack.pkid,
                reason: format!("{reason:?}"),
            },
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => Signal::Sent(pkid),
        Event::Outgoing(Outgoing::Disconnect) => Signal::Disconnected,
        _ => Signal::Other,
    }
}

/// Makes ring the process's rustls crypto provider, unless one is installed already. rumqttc builds its
/// TLS configuration from the process default; with both of rustls' providers compiled in (any build
/// where another crate enables `aws-lc-rs`, such as the workspace's tests), there is no default and the
/// first TLS connection would panic. ring: the packaged gateway has only it (gateway/Cargo.toml).
fn install_crypto_provider() {
    // `Err` means a provider is installed already, which is all this needs.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_client_window_sizes_leave_room_for_status_publishes() {
        assert_eq!(rumqttc_inflight(100), 204);
        assert_eq!(rumqttc_inflight(u16::MAX), u16::MAX - 1);
        assert_eq!(channel_capacity(1), 5);
    }

    #[test]
    fn uplink_client_v5_refusing_puback_is_not_an_ack() {
        let ack = |reason| {
            rumqttc::v5::Event::Incoming(mqtt5::Packet::PubAck(mqtt5::PubAck {
                pkid: 3,
                reason,
                properties: None,
            }))
        };
        assert_eq!(
            signal_v5(ack(mqtt5::PubAckReason::Success)),
            Signal::Acked(3)
        );
        assert_eq!(
            signal_v5(ack(mqtt5::PubAckReason::NoMatchingSubscribers)),
            Signal::Acked(3)
        );
        assert!(matches!(
            signal_v5(ack(mqtt5::PubAckReason::NotAuthorized)),
            Signal::Refused { pkid: 3, .. }
        ));
    }
}
