//! The pure state of the uplink: which journal record a PUBACK acknowledges, and how long to wait
//! before reconnecting. No I/O and no clock: time is passed in (STYLE practice 7), so the tests below
//! drive every case deterministically.
//!
//! # Why FIFO correlation is sound
//!
//! rumqttc's `publish()` does not return the packet id; the id is assigned inside the event loop when the
//! request is taken off its channel, and reported as `Event::Outgoing(Outgoing::Publish(pkid))`. The
//! channel is FIFO and one event loop takes requests off it one at a time, so the n-th
//! `Outgoing::Publish` event belongs to the n-th publish request handed over. The one wrinkle is a packet
//! id collision (a broker that acks out of order while ids wrap): rumqttc then reports
//! `Outgoing::AwaitAck` instead, stops taking requests, and reports the held publish's
//! `Outgoing::Publish` later, still before any later request's — the order is kept. Retransmissions
//! from rumqttc's own `pending` queue would break this, which is why the uplink throws that queue away on
//! every connection loss (the journal, not rumqttc, decides what is resent).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What a publish handed to rumqttc carries, as far as acknowledgement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Item {
    /// A journal record: its seq is acked in the journal after the PUBACK.
    Record(u64),
    /// A retained status message (online after CONNACK, offline before a clean disconnect).
    Status,
}

/// The correlation broke: rumqttc reported something that does not fit what was handed to it. The
/// uplink treats this like a connection loss (drop the session, republish from the journal), which is
/// always safe; it should never happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CorrelationError {
    /// `Outgoing::Publish(pkid)` with nothing handed over.
    #[error("publish event for pkid {0} with no request outstanding")]
    NothingQueued(u16),
    /// `Outgoing::Publish(pkid)` while `pkid` is still unacknowledged.
    #[error("pkid {0} reused while still in flight")]
    PkidInUse(u16),
}

/// Publishes handed to rumqttc in one connection, from hand-over to PUBACK.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// Handed to rumqttc, packet id not known yet (FIFO).
    queued: VecDeque<Item>,
    /// On the wire, waiting for the PUBACK: packet id → item, when it was written.
    on_wire: HashMap<u16, (Item, Instant)>,
    /// Records among `queued` and `on_wire` (the number the `inflight` setting bounds).
    records: usize,
    /// The highest journal seq handed over in this connection: the next journal read starts after it.
    cursor: Option<u64>,
}

impl Window {
    /// A publish was handed to rumqttc (its channel accepted it).
    pub(crate) fn handed(&mut self, item: Item) {
        if let Item::Record(seq) = item {
            self.records += 1;
            self.cursor = Some(self.cursor.map_or(seq, |c| c.max(seq)));
        }
        self.queued.push_back(item);
    }

    /// A record was looked at but not handed over (it can never be published, e.g. an invalid topic):
    /// the next journal read skips it in this connection; it stays in the journal.
    pub(crate) fn skip(&mut self, seq: u64) {
        self.cursor = Some(self.cursor.map_or(seq, |c| c.max(seq)));
    }

    /// `Outgoing::Publish(pkid)`: the oldest handed publish got `pkid` and was written.
    pub(crate) fn sent(&mut self, pkid: u16, now: Instant) -> Result<Item, CorrelationError> {
        if self.on_wire.contains_key(&pkid) {
            return Err(CorrelationError::PkidInUse(pkid));
        }
        let item = self
            .queued
            .pop_front()
            .ok_or(CorrelationError::NothingQueued(pkid))?;
        self.on_wire.insert(pkid, (item, now));
        Ok(item)
    }

    /// `Incoming::PubAck(pkid)`: returns what was acknowledged and its publish→PUBACK latency, or `None`
    /// for a packet id that is not outstanding (rumqttc errors on those itself).
    pub(crate) fn acked(&mut self, pkid: u16, now: Instant) -> Option<(Item, Duration)> {
        let (item, sent_at) = self.on_wire.remove(&pkid)?;
        if matches!(item, Item::Record(_)) {
            self.records -= 1;
        }
        Some((item, now.saturating_duration_since(sent_at)))
    }

    /// Records handed over and not yet PUBACKed.
    pub(crate) fn records(&self) -> usize {
        self.records
    }

    /// Nothing handed over is unacknowledged (records or status).
    pub(crate) fn is_empty(&self) -> bool {
        self.queued.is_empty() && self.on_wire.is_empty()
    }

    /// Where the next journal read starts (exclusive).
    pub(crate) fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    /// The connection is gone: forget everything. What was not PUBACKed is still in the journal and is
    /// republished from the oldest after the next CONNACK.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The delay before reconnect attempt `attempt` (0 = the first after a loss): "full jitter" — uniform in
/// `0..=min(max, min · 2^attempt)` — so that a thousand gateways that lost the same broker do not come
/// back in lock-step. `unit` is a uniform random number in `[0, 1)`.
pub(crate) fn backoff_delay(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(31));
    let bound = min.saturating_mul(factor).min(max);
    bound.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_window_fifo_correlation_maps_pkids_to_seqs() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.handed(Item::Status);
        w.handed(Item::Record(7));
        w.handed(Item::Record(9));
        assert_eq!(w.records(), 2);
        assert_eq!(w.cursor(), Some(9));
        assert_eq!(w.sent(1, t0), Ok(Item::Status));
        assert_eq!(w.sent(2, t0), Ok(Item::Record(7)));
        assert_eq!(w.sent(3, t0), Ok(Item::Record(9)));
        // Out-of-order acks are fine: each pkid maps to its own record.
        let later = t0 + Duration::from_millis(5);
        assert_eq!(
            w.acked(3, later),
            Some((Item::Record(9), Duration::from_millis(5)))
        );
        assert_eq!(
            w.acked(3, later),
            None,
            "a second PUBACK for the same pkid acks nothing"
        );
        assert_eq!(w.acked(1, later).map(|a| a.0), Some(Item::Status));
        assert_eq!(w.records(), 1);
        assert!(!w.is_empty());
        assert_eq!(w.acked(2, later).map(|a| a.0), Some(Item::Record(7)));
        assert!(w.is_empty());
        assert_eq!(w.records(), 0);
    }

    #[test]
    fn uplink_window_pkid_reuse_after_ack_and_collision_order() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.handed(Item::Record(1));
        w.handed(Item::Record(2));
        w.sent(1, t0).unwrap();
        // Record 2 collided in rumqttc (AwaitAck, no Publish event yet); the PUBACK of 1 comes first,
        // then rumqttc sends the held publish with pkid 1.
        assert_eq!(w.acked(1, t0).map(|a| a.0), Some(Item::Record(1)));
        assert_eq!(w.sent(1, t0), Ok(Item::Record(2)));
        assert_eq!(w.acked(1, t0).map(|a| a.0), Some(Item::Record(2)));
    }

    #[test]
    fn uplink_window_inconsistencies_are_errors_not_panics() {
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.sent(4, t0), Err(CorrelationError::NothingQueued(4)));
        w.handed(Item::Record(1));
        w.handed(Item::Record(2));
        w.sent(4, t0).unwrap();
        assert_eq!(w.sent(4, t0), Err(CorrelationError::PkidInUse(4)));
        assert_eq!(w.acked(99, t0), None);
    }

    #[test]
    fn uplink_window_reset_and_skip_move_the_cursor() {
        let mut w = Window::default();
        w.handed(Item::Record(3));
        w.skip(5);
        assert_eq!(w.cursor(), Some(5));
        w.reset();
        assert_eq!(
            w.cursor(),
            None,
            "after a reconnect the journal is read from the oldest again"
        );
        assert!(w.is_empty());
        assert_eq!(w.records(), 0);
    }

    #[test]
    fn uplink_backoff_is_capped_exponential_with_full_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        // unit = 1.0 shows the bound itself.
        assert_eq!(backoff_delay(0, min, max, 1.0), min);
        assert_eq!(backoff_delay(1, min, max, 1.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(5, min, max, 1.0), Duration::from_millis(3200));
        assert_eq!(backoff_delay(6, min, max, 1.0), max);
        assert_eq!(backoff_delay(u32::MAX, min, max, 1.0), max, "no overflow");
        assert_eq!(backoff_delay(3, min, max, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(3, min, max, 0.5), Duration::from_millis(400));
        assert_eq!(
            backoff_delay(3, min, max, 7.0),
            Duration::from_millis(800),
            "unit is clamped"
        );
    }
}
