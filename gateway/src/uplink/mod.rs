//! The uplink: journal → MQTT (QoS 1) → broker, and the only task that drives rumqttc's event loop.
//!
//! # What it promises
//!
//! - **A record leaves the journal only after the broker PUBACKed it** (DESIGN promise 2, STYLE
//!   practice 8). rumqttc's `publish()` does not return the packet id, so every publish handed over is
//!   queued, `Event::Outgoing(Outgoing::Publish(pkid))` pins the oldest queued one to `pkid`, and
//!   `Incoming::PubAck(pkid)` acks that record's journal seq. An MQTT 5 PUBACK with a failure reason code
//!   (e.g. *not authorized*) is not an ack: the record stays.
//! - **The journal is the source of truth, not rumqttc's session.** On any connection loss the uplink
//!   discards rumqttc's retransmission queue, the requests still in its channel and its packet-id state
//!   (see the `client` module), and after the next CONNACK republishes every unacked record from the
//!   oldest, in journal order — so the order per device holds, and a record sent twice carries the same
//!   reading id (harmless by design, promise 3). Sessions are clean (`clean_session` / `clean_start`): the broker
//!   keeps nothing for us either.
//! - **Bounded in flight.** At most [`UplinkConfig::inflight`] records are handed over and not yet
//!   PUBACKed. New records come from the [`Handoff`] the journal writer fills after each commit, without
//!   a journal read, when they follow on from what was handed over; otherwise (a gap, a reconnect, a
//!   backlog) from the journal. As a safety net the journal is looked at every few seconds anyway.
//! - **The event loop never waits for the disk.** Journal reads (read ahead, `READ_AHEAD` records at a
//!   time) and acks (batching what came in meanwhile) run as background blocking jobs, one of each at a
//!   time, so PUBACKs keep being read and publishes keep being written while the journal's lock is held
//!   through an `fdatasync`.
//! - **Reconnects with capped exponential backoff and full jitter** (rumqttc has none): the delay bound
//!   doubles from `backoff_min` to `backoff_max` per failed attempt, and resets once a connection has
//!   delivered a record or held for `backoff_max` (not merely because the status message got through:
//!   a broker that accepts connections but refuses or drops the readings is not hammered).
//! - **Status.** The last will is the retained offline payload on `status_topic`; every CONNACK is
//!   followed by the retained online payload; a clean shutdown publishes the offline payload itself
//!   (the broker does not send the will after a DISCONNECT).
//! - **Graceful shutdown.** When `shutdown` fires, no new records are handed over; the uplink waits up to
//!   `shutdown_grace` for the outstanding PUBACKs, acks what came back, and disconnects. What is still
//!   unacked stays in the journal for the next start.
//! - **No message wedges it.** The largest packet taken from the broker is `max_packet_bytes`, announced
//!   in the MQTT 5 CONNECT (the broker drops a larger message for this client). MQTT 3.1.1 cannot announce
//!   it: a larger packet breaks the connection at its header, and since the only subscription is the
//!   retained configuration, the following connections go without it for ten minutes (reported to the
//!   application as [`Inbound::TooLarge`]) instead of reconnecting in a loop.
//! - **Idle is free.** With nothing to send the uplink sleeps on the [`Handoff`]'s notification; a short
//!   journal read tells it the journal's last seq, so the handoff's next records are placed without
//!   another read even when the journal never held a record.
//! - **Privacy.** Payloads are never logged; logs carry topic, seq and packet id only.
//!
//! # Metrics (through the `metrics` facade)
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `phg_readings_delivered_total` | counter | records PUBACKed by the broker |
//! | `phg_mqtt_reconnects_total` | counter | sessions re-established after a loss |
//! | `phg_publish_latency_seconds` | histogram | publish written → PUBACK |
//! | `phg_inflight` | gauge | records handed over and not yet PUBACKed |
//! | `phg_publish_refused_total` | counter | MQTT 5 PUBACKs with a failure reason code |
//! | `phg_journal_ack_errors_total` | counter | journal acks that failed (the records will be resent) |
//!
//! # Layout
//!
//! - [`config`] — [`UplinkConfig`] and its validation.
//! - `window` — the pure correlation state (packet id → journal seq) and the backoff formula.
//! - `client` — rumqttc's MQTT 3.1.1 and 5 clients behind one face.

mod client;
pub mod config;
mod window;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use config::{
    CheckedUplinkConfig, ConfigError, DEFAULT_MAX_PACKET_BYTES, Inbound, MIN_MAX_PACKET_BYTES,
    MqttVersion, Secret, StatusSource, TlsFiles, UplinkConfig,
};

use crate::journal::{Journal, JournalError, Record};
use crate::pipeline::handoff::Handoff;
use client::{Driver, HandOver, LinkError, Publisher, Signal};
use window::{Item, Window, backoff_delay};

/// How often the journal is looked at even without a wake-up (a missed `notify_one` costs at most this).
const RECHECK_EVERY: Duration = Duration::from_secs(2);
/// Acks are written to the journal in batches (one `fdatasync` each): when this many PUBACKs are
/// waiting, or [`ACK_LINGER`] after the first of them.
const ACK_BATCH: usize = 64;
/// See [`ACK_BATCH`]. Short: a PUBACKed record that is not yet acked in the journal is sent again after
/// a crash.
const ACK_LINGER: Duration = Duration::from_millis(10);
/// Acks are written without their own `fdatasync` ([`Journal::ack_unsynced`]: the next append's covers
/// them); if no append came, they are synced this long after the first of them written since the last
/// `fdatasync` ([`Journal::sync_acks_older_than`]). Losing them to a power
/// cut only means resending those records (same reading ids). 25 s: readings a second or a few apart
/// (a kiosk, a stream of one-reading sessions), and a meter syncing every 10 s, carry their acks in the
/// next append's `fdatasync` instead of one more each, which also writes the journal's tail page again
/// (at 1 s a third of the readings paid a second fsync; at 5 s a meter syncing every 10 s paid a page
/// per sync: issue 14 item 6, `tests/benches/disk_writes.rs`). Not longer: the kernel writes a dirty
/// page back 30 s after it was dirtied anyway (`vm.dirty_expire_centisecs`), so waiting longer would
/// save no write and only widen what a power cut makes us resend.
pub(crate) const ACK_SYNC_AFTER: Duration = Duration::from_secs(25);
/// Records read from the journal per background read; the next read starts when half are used. 256, not
/// the 512 it was: decoded records are most of what a catch-up holds besides the journal's index (a
/// 20 000-reading catch-up peaked 0.4 MB lower: tests/benches/gateway_memory.rs), and the default window
/// (`inflight`, 100) still has more than its worth ready at every refill. `--bench pipeline` (b) cannot tell
/// the two apart: 0.84 and 0.71 of raw QoS 1 at 256, 0.77 at 512 in the same session (0.82–0.89 in five
/// runs at 512 the session before).
const READ_AHEAD: usize = 256;
/// After a failed journal read, the next one waits this long.
const READ_RETRY_AFTER: Duration = Duration::from_secs(1);
/// After a packet over `max_packet_bytes` broke a connection (MQTT 3.1.1, which cannot announce the
/// limit: the retained configuration would come back at every subscription), the configuration topic is
/// left alone this long, so the uplink keeps delivering instead of reconnecting in a loop.
const CONFIG_RESUBSCRIBE_AFTER: Duration = Duration::from_secs(600);
/// How long a clean disconnect may take after the shutdown grace.
const DISCONNECT_WAIT: Duration = Duration::from_secs(1);

/// Why the uplink stopped. Connection problems are never among them: those are retried forever.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// The configuration was refused; nothing was connected. Fix the named setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The journal is poisoned (a failed `fdatasync`): it must be reopened before anything more can be
    /// acked. Unacked records stay in it and are sent after the restart.
    #[error("uplink stopped: {0}")]
    Journal(#[source] JournalError),
    /// The journal's mutex was poisoned by a panic elsewhere. Nothing was acked that was not PUBACKed.
    #[error("uplink stopped: the journal lock was poisoned by a panic in another task")]
    JournalLockPoisoned,
    /// A blocking journal call panicked.
    #[error("uplink stopped: a journal call panicked")]
    JournalTaskPanicked,
}

/// What one [`run`] did, for the caller's log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Record publishes handed to the MQTT client (first sends and republishes after a reconnect).
    pub published: u64,
    /// Records PUBACKed by the broker (a republished record counts again if PUBACKed again).
    pub delivered: u64,
    /// Sessions established (CONNACKs).
    pub connections: u64,
    /// Connections lost (or dropped on purpose after a refused publish).
    pub connection_losses: u64,
    /// MQTT 5 PUBACKs that refused a record.
    pub refused: u64,
    /// Records handed over but not PUBACKed when the uplink stopped (they stay in the journal).
    pub unacked_at_exit: u64,
}

/// Runs the uplink until `shutdown` is cancelled (then drains, see the module doc) or a fatal error.
///
/// `journal` is shared with the pipeline; every call into it runs on a blocking thread under the lock,
/// briefly (`pending` reads records; `ack` writes one frame and `fdatasync`s). `handoff` is filled (and
/// the uplink woken) by the journal writer after each commit; an append that bypasses the writer calls
/// [`Handoff::wake`].
///
/// # Errors
///
/// [`UplinkError`]: an invalid configuration (before connecting) or a journal that can no longer ack.
/// Broker and network failures are not errors: they are logged and retried with backoff.
pub async fn run(
    cfg: UplinkConfig,
    journal: Arc<Mutex<Journal>>,
    handoff: Arc<Handoff>,
    shutdown: CancellationToken,
) -> Result<UplinkStats, UplinkError> {
    let cfg = cfg.validate()?;
    run_checked(cfg, journal, handoff, shutdown).await
}

/// [`run`] with a configuration that was already validated.
///
/// # Errors
///
/// As [`run`], minus the configuration errors.
pub async fn run_checked(
    cfg: CheckedUplinkConfig,
    journal: Arc<Mutex<Journal>>,
    handoff: Arc<Handoff>,
    shutdown: CancellationToken,
) -> Result<UplinkStats, UplinkError> {
    describe_metrics();
    let (publisher, mut driver) = client::build(&cfg);
    info!(
        host = %cfg.host,
        port = cfg.port,
        tls = cfg.tls.is_some(),
        version = ?cfg.mqtt_version,
        client_id = %cfg.client_id,
        "uplink starting"
    );
    let mut uplink = Uplink {
        cfg,
        journal,
        handoff,
        shutdown,
        publisher,
        window: Window::default(),
        to_ack: Vec::new(),
        ack_job: None,
        sync_due: None,
        read_ahead: std::collections::VecDeque::new(),
        read_job: None,
        read_retry_at: None,
        connection_generation: 0,
        ack_due: None,
        connected: false,
        connected_at: None,
        drain_deadline: None,
        maybe_more: true,
        read_through: None,
        next_recheck: Instant::now() + RECHECK_EVERY,
        config_paused_until: None,
        config_subscribed: false,
        next_status: Instant::now(),
        attempt: 0,
        stats: UplinkStats::default(),
    };
    let result = uplink.run(&mut driver).await;
    metrics::gauge!("phg_inflight").set(0.0);
    result
}

fn describe_metrics() {
    metrics::describe_counter!(
        "phg_readings_delivered_total",
        "Records PUBACKed by the MQTT broker."
    );
    metrics::describe_counter!(
        "phg_mqtt_reconnects_total",
        "MQTT sessions re-established after a loss."
    );
    metrics::describe_histogram!(
        "phg_publish_latency_seconds",
        metrics::Unit::Seconds,
        "Time from a publish being written to its PUBACK."
    );
    metrics::describe_gauge!(
        "phg_inflight",
        "Records handed to the MQTT client and not yet PUBACKed."
    );
    metrics::describe_counter!(
        "phg_publish_refused_total",
        "MQTT 5 PUBACKs with a failure reason code."
    );
    metrics::describe_counter!("phg_journal_ack_errors_total", "Journal acks that failed.");
}

/// What ended one wait on the event loop.
enum Step {
    /// The event loop yielded.
    Polled(Result<Signal, LinkError>),
    /// Stop now: shutdown while not connected, or the shutdown grace ran out.
    Stop,
}

/// Whether the connection is still wanted after a signal.
enum Flow {
    Continue,
    /// Drop the session and start over from the journal (a refused publish, a correlation fault).
    Reconnect(String),
}

/// A journal ack running on a blocking thread, and the seqs it covers (kept to retry them on failure).
struct AckJob {
    seqs: Vec<u64>,
    /// When the acks the job left unsynced are due (`ack_sync_after`), if any.
    handle: JoinHandle<Result<Option<std::time::Instant>, UplinkError>>,
}

/// A journal read running on a blocking thread.
struct ReadJob {
    /// The window it was started for (see `Uplink::connection_generation`).
    generation: u64,
    handle: JoinHandle<Result<JournalRead, UplinkError>>,
}

/// What a background journal read found.
struct JournalRead {
    /// Pending records after the read's start, in seq order, at most `READ_AHEAD`.
    records: Vec<Record>,
    /// The journal's highest seq at the time of the read ([`Journal::last_seq`]).
    last_seq: u64,
}

/// Completes when the running job does; never, when there is none (a `select!` branch).
async fn job_done<T>(handle: Option<&mut JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match handle {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

struct Uplink {
    cfg: CheckedUplinkConfig,
    journal: Arc<Mutex<Journal>>,
    handoff: Arc<Handoff>,
    shutdown: CancellationToken,
    publisher: Publisher,
    window: Window,
    /// Seqs PUBACKed and not yet handed to an ack job.
    to_ack: Vec<u64>,
    /// The journal ack being written in the background, if any.
    ack_job: Option<AckJob>,
    /// When acks written without `fdatasync` are to be synced.
    sync_due: Option<Instant>,
    /// Records read from the journal and not yet handed over, in seq order, following the cursor.
    read_ahead: std::collections::VecDeque<Record>,
    /// The journal read running in the background, if any.
    read_job: Option<ReadJob>,
    /// After a failed read: no new one before this.
    read_retry_at: Option<Instant>,
    /// Bumped whenever the window is reset: a read started before belongs to a forgotten cursor.
    connection_generation: u64,
    /// When `to_ack` must be written at the latest.
    ack_due: Option<Instant>,
    /// A CONNACK was seen and the connection has not failed since.
    connected: bool,
    /// When the current connection's CONNACK came.
    connected_at: Option<Instant>,
    /// Set when shutdown began: stop waiting for PUBACKs at this instant.
    drain_deadline: Option<Instant>,
    /// The journal may hold records after the window's cursor (cleared when a read came back short).
    maybe_more: bool,
    /// After a short read: the journal's highest seq then. Every pending record up to it was read, so
    /// the next one to publish follows it even when the window's cursor is behind it or unset (a journal
    /// that never held a record, or whose records were all acked before this start). Without it the
    /// handoff cannot place its records and sends the uplink back to the journal, which finds nothing —
    /// a read loop that burnt a whole core on an idle gateway (issue 11, defect 6).
    read_through: Option<u64>,
    next_recheck: Instant,
    /// Set after an oversized packet: subscribe to the configuration topic again only from then on.
    config_paused_until: Option<Instant>,
    /// The configuration topic is subscribed in this connection.
    config_subscribed: bool,
    /// When the online status is published again.
    next_status: Instant,
    /// Failed connection attempts since a record was last PUBACKed or a connection last held for
    /// `backoff_max`.
    attempt: u32,
    stats: UplinkStats,
}

impl Uplink {
    async fn run(&mut self, driver: &mut Driver) -> Result<UplinkStats, UplinkError> {
        loop {
            match self.next_step(driver).await? {
                Step::Stop => break,
                Step::Polled(Ok(signal)) => {
                    if let Flow::Reconnect(why) = self.on_signal(signal).await? {
                        warn!(reason = %why, "uplink dropping the MQTT session; unacked records will be republished");
                        self.lose_connection(driver).await?;
                        if self.drain_deadline.is_some() || !self.back_off().await {
                            break;
                        }
                        continue;
                    }
                }
                Step::Polled(Err(e)) => {
                    if let Some(bytes) = e.too_large() {
                        self.on_too_large(bytes);
                    } else if self.connected {
                        warn!(error = %e, unacked = self.window.records(), "uplink connection lost");
                    } else {
                        warn!(error = %e, attempt = self.attempt, "uplink cannot connect to the broker");
                    }
                    self.lose_connection(driver).await?;
                    if self.drain_deadline.is_some() || !self.back_off().await {
                        break;
                    }
                    continue;
                }
            }
            if self.drain_deadline.is_some() && self.window.is_empty() {
                break;
            }
            self.fill();
        }
        self.finish(driver).await
    }

    /// Waits for the next event-loop event, serving wake-ups, ack flushes and shutdown meanwhile.
    ///
    /// The `poll` future lives across those other branches and is only dropped when it completes or
    /// the uplink stops: rumqttc takes a request off its channel before writing it, so a poll cancelled
    /// mid-write could lose a publish it already counted as sent.
    async fn next_step(&mut self, driver: &mut Driver) -> Result<Step, UplinkError> {
        let poll = driver.poll();
        tokio::pin!(poll);
        // Every event handled is a check-in; the ticker covers quiet times.
        self.check_in();
        let mut alive = self.heartbeat_ticker();
        loop {
            let draining = self.drain_deadline.is_some();
            let drain_deadline = self.drain_deadline.unwrap_or_else(Instant::now);
            let ack_due = self.ack_due.unwrap_or_else(Instant::now);
            let sync_due = self.sync_due.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if !draining => {
                    self.begin_drain();
                    // Nothing to wait for (not connected, or not even the offline status could be
                    // handed over): stop now rather than at the grace deadline.
                    if !self.connected || self.window.is_empty() {
                        return Ok(Step::Stop);
                    }
                }
                _ = sleep_until(drain_deadline), if draining => return Ok(Step::Stop),
                _ = alive.tick() => self.check_in(),
                res = &mut poll => return Ok(Step::Polled(res)),
                done = job_done(self.ack_job.as_mut().map(|j| &mut j.handle)) => self.on_ack_done(done)?,
                done = job_done(self.read_job.as_mut().map(|j| &mut j.handle)) => {
                    self.on_read_done(done)?;
                    self.fill();
                }
                _ = sleep_until(ack_due), if self.ack_due.is_some() && self.ack_job.is_none() => {
                    self.start_ack_job();
                }
                _ = sleep_until(sync_due), if self.sync_due.is_some() && self.ack_job.is_none() => {
                    self.start_sync_job(false);
                }
                _ = self.handoff.notified(), if self.connected && !draining => self.fill(),
                _ = sleep_until(self.next_status), if self.connected && !draining => {
                    self.next_status = Instant::now() + self.cfg.status_every;
                    self.publish_status(true);
                }
                _ = sleep_until(self.config_paused_until.unwrap_or_else(Instant::now)),
                    if self.connected && !draining && !self.config_subscribed && self.config_paused_until.is_some() =>
                {
                    self.config_paused_until = None;
                    self.subscribe_config();
                }
                _ = sleep_until(self.next_recheck), if self.connected && !draining => {
                    self.next_recheck = Instant::now() + RECHECK_EVERY;
                    self.maybe_more = true;
                    self.fill();
                }
            }
        }
    }

    fn set_connected_flag(&self, connected: bool) {
        if let Some(flag) = &self.cfg.connected_flag {
            flag.store(connected, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn on_signal(&mut self, signal: Signal) -> Result<Flow, UplinkError> {
        match signal {
            Signal::ConnAck => {
                self.connected = true;
                self.set_connected_flag(true);
                self.connected_at = Some(Instant::now());
                if let Some(l) = &self.cfg.link_state {
                    l.connected();
                }
                self.stats.connections += 1;
                if self.stats.connections > 1 {
                    metrics::counter!("phg_mqtt_reconnects_total").increment(1);
                }
                info!(host = %self.cfg.host, port = self.cfg.port, "uplink connected");
                self.reset_window();
                // Status first: the CRM sees "online" before the backlog.
                self.publish_status(true);
                self.next_status = Instant::now() + self.cfg.status_every;
                self.config_subscribed = false;
                if self.config_paused_until.is_none_or(|t| Instant::now() >= t) {
                    self.config_paused_until = None;
                    self.subscribe_config();
                }
                Ok(Flow::Continue)
            }
            Signal::Sent(pkid) => match self.window.sent(pkid, std::time::Instant::now()) {
                Ok(Item::Record(seq)) => {
                    debug!(seq, pkid, "record published");
                    Ok(Flow::Continue)
                }
                Ok(Item::Status) => Ok(Flow::Continue),
                Err(e) => {
                    error!(error = %e, "uplink lost track of packet ids");
                    Ok(Flow::Reconnect(e.to_string()))
                }
            },
            Signal::Acked(pkid) => {
                self.on_puback(pkid).await?;
                Ok(Flow::Continue)
            }
            Signal::Refused { pkid, reason } => match self.on_refused(pkid, &reason) {
                // Later records of the same device may already be accepted; starting over from the
                // journal keeps the oldest-first order and retries with backoff.
                Some(seq) => Ok(Flow::Reconnect(format!(
                    "broker refused seq {seq}: {reason}"
                ))),
                None => Ok(Flow::Continue),
            },
            Signal::Message { topic, payload } => {
                self.on_message(&topic, payload);
                Ok(Flow::Continue)
            }
            Signal::Disconnected | Signal::Other => Ok(Flow::Continue),
        }
    }

    fn subscribe_config(&mut self) {
        if let Some(topic) = self.cfg.config_topic.clone() {
            match self.publisher.subscribe(&topic) {
                Ok(()) => self.config_subscribed = true,
                Err(e) => {
                    warn!(?e, topic = %topic, "could not subscribe to the configuration topic")
                }
            }
        }
    }

    /// A packet over `max_packet_bytes` broke the connection. The only topic subscribed to is the
    /// configuration's, and it is retained: subscribing again at once would bring it back and break
    /// the next connection too. The next connections go without it for [`CONFIG_RESUBSCRIBE_AFTER`] and
    /// the application is told (it reports a `config_rejected` event).
    fn on_too_large(&mut self, bytes: usize) {
        let max = self.cfg.max_packet_bytes;
        warn!(
            bytes,
            max,
            resubscribe_in_s = CONFIG_RESUBSCRIBE_AFTER.as_secs(),
            "uplink: the broker sent a packet over max_packet_bytes; reconnecting without the configuration subscription"
        );
        self.config_paused_until = Some(Instant::now() + CONFIG_RESUBSCRIBE_AFTER);
        if let Some(tx) = &self.cfg.inbound
            && tx.try_send(Inbound::TooLarge { bytes, max }).is_err()
        {
            warn!(
                "oversized configuration notice dropped (the previous message is still being applied)"
            );
        }
    }

    /// A message on the configuration topic: handed on, never waited for (the event loop is ours).
    fn on_message(&self, topic: &str, payload: Vec<u8>) {
        if self.cfg.config_topic.as_deref() != Some(topic) {
            debug!(topic = %topic, "message on a topic not subscribed to (ignored)");
            return;
        }
        if let Some(tx) = &self.cfg.inbound
            && tx.try_send(Inbound::Message(payload)).is_err()
        {
            warn!(topic = %topic, "configuration message dropped (the previous one is still being applied)");
        }
    }

    async fn on_puback(&mut self, pkid: u16) -> Result<(), UplinkError> {
        match self.window.acked(pkid, std::time::Instant::now()) {
            Some((Item::Record(seq), latency)) => {
                debug!(seq, pkid, "record PUBACKed");
                if let Some(l) = &self.cfg.link_state {
                    l.puback();
                }
                self.attempt = 0;
                self.stats.delivered += 1;
                metrics::counter!("phg_readings_delivered_total").increment(1);
                metrics::histogram!("phg_publish_latency_seconds").record(latency.as_secs_f64());
                self.set_inflight_gauge();
                self.to_ack.push(seq);
                if self.to_ack.len() >= ACK_BATCH {
                    self.start_ack_job();
                } else if self.ack_due.is_none() {
                    self.ack_due = Some(Instant::now() + ACK_LINGER);
                }
            }
            // Not a reset of the backoff: a broker that takes the status but refuses or drops every
            // reading must not be hammered.
            Some((Item::Status, _)) => {}
            None => debug!(pkid, "PUBACK for a packet id not in flight (ignored)"),
        }
        Ok(())
    }

    /// An MQTT 5 PUBACK with a failure reason: the message was not taken. Returns the record's seq (it
    /// stays in the journal), or `None` for the status message or an unknown packet id.
    fn on_refused(&mut self, pkid: u16, reason: &str) -> Option<u64> {
        match self.window.acked(pkid, std::time::Instant::now()) {
            Some((Item::Record(seq), _)) => {
                self.stats.refused += 1;
                metrics::counter!("phg_publish_refused_total").increment(1);
                error!(
                    seq,
                    pkid, reason, "broker refused a record; it stays in the journal"
                );
                Some(seq)
            }
            Some((Item::Status, _)) => {
                warn!(pkid, reason, topic = %self.cfg.status_topic, "broker refused the status message");
                None
            }
            None => None,
        }
    }

    /// Forgets the correlation and whatever was read ahead: the next fill starts over from the oldest
    /// pending record in the journal.
    fn reset_window(&mut self) {
        self.window.reset();
        self.read_ahead.clear();
        self.connection_generation = self.connection_generation.wrapping_add(1);
        self.maybe_more = true;
        self.read_through = None;
    }

    /// The last seq dealt with in this connection: handed over, skipped, or known absent from the
    /// journal by a short read. Records after it are the next to publish.
    fn position(&self) -> Option<u64> {
        match (self.window.cursor(), self.read_through) {
            (Some(c), Some(r)) => Some(c.max(r)),
            (c, r) => c.or(r),
        }
    }

    /// Hands records to the client until the window is full or there are no more at hand, and starts a
    /// journal read when more may be there. Never waits.
    ///
    /// Sources, in order: what was read ahead from the journal; when the journal holds nothing beyond
    /// that, the [`Handoff`]'s records right after the cursor (it says when the journal must be read
    /// instead). Whatever room there is gets filled at once: a link left silent with room in the window
    /// stalls — a broker with Nagle on (Mosquitto's default) holds its next PUBACKs until our TCP ACK,
    /// which the kernel delays up to 40 ms when there is nothing to send (measured: ~4 k records/s
    /// instead of ~40 k, bursts 40 ms apart).
    fn fill(&mut self) {
        if !self.connected || self.drain_deadline.is_some() {
            return;
        }
        let window = usize::from(self.cfg.inflight);
        loop {
            let room = window.saturating_sub(self.window.records());
            if room == 0 {
                break;
            }
            if let Some(cursor) = self.window.cursor() {
                while self.read_ahead.front().is_some_and(|r| r.seq <= cursor) {
                    self.read_ahead.pop_front();
                }
            }
            if !self.read_ahead.is_empty() {
                let take = room.min(self.read_ahead.len());
                let records: Vec<Record> = self.read_ahead.drain(..take).collect();
                if !self.hand_over(records) {
                    break;
                }
                continue;
            }
            if self.maybe_more {
                break;
            }
            let taken = self.handoff.take(self.position(), room);
            if taken.read_journal {
                self.maybe_more = true;
            }
            if taken.records.is_empty() || !self.hand_over(taken.records) {
                break;
            }
        }
        if self.maybe_more && self.read_ahead.len() < READ_AHEAD / 2 {
            self.start_read_job();
        }
        self.set_inflight_gauge();
    }

    /// Starts reading the journal after the last record at hand, unless a read is running.
    fn start_read_job(&mut self) {
        if self.read_job.is_some() || self.read_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let after = self.read_ahead.back().map(|r| r.seq).or(self.position());
        let journal = Arc::clone(&self.journal);
        let handle = tokio::task::spawn_blocking(move || {
            let guard = journal
                .lock()
                .map_err(|_| UplinkError::JournalLockPoisoned)?;
            let records = guard
                .pending(after, READ_AHEAD)
                .map_err(UplinkError::Journal)?;
            Ok(JournalRead {
                records,
                last_seq: guard.last_seq(),
            })
        });
        self.read_job = Some(ReadJob {
            generation: self.connection_generation,
            handle,
        });
    }

    /// The background read finished: keep what follows on from the records at hand.
    fn on_read_done(
        &mut self,
        done: Result<Result<JournalRead, UplinkError>, tokio::task::JoinError>,
    ) -> Result<(), UplinkError> {
        let Some(job) = self.read_job.take() else {
            return Ok(());
        };
        let result = done.map_err(|_| UplinkError::JournalTaskPanicked)?;
        if job.generation != self.connection_generation {
            // Read for a window that was reset since; the next fill reads again from the oldest.
            return Ok(());
        }
        match result {
            Ok(JournalRead { records, last_seq }) => {
                // Where this read started, before `read_through` moves past what it returned.
                let last = self.read_ahead.back().map(|r| r.seq).or(self.position());
                if records.len() < READ_AHEAD {
                    self.maybe_more = false;
                    self.read_through =
                        Some(self.read_through.map_or(last_seq, |r| r.max(last_seq)));
                }
                self.read_ahead.extend(
                    records
                        .into_iter()
                        .filter(|r| last.is_none_or(|l| r.seq > l)),
                );
                Ok(())
            }
            Err(UplinkError::Journal(e)) if !matches!(e, JournalError::Poisoned { .. }) => {
                // The records stay in the journal; tried again shortly (not at every PUBACK).
                error!(error = %e, "journal read failed; will retry");
                self.read_retry_at = Some(Instant::now() + READ_RETRY_AFTER);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Hands records to the MQTT client in order. Returns `false` when the client's channel is full (the
    /// rest stays in the journal and is read again).
    fn hand_over(&mut self, records: Vec<Record>) -> bool {
        let mut all = true;
        for Record {
            seq,
            topic,
            payload,
            ..
        } in records
        {
            match self.publisher.publish(&topic, payload, false) {
                Ok(()) => {
                    self.window.handed(Item::Record(seq));
                    self.stats.published += 1;
                }
                Err(HandOver::InvalidTopic) => {
                    // Cannot be published, must not be dropped: it stays in the journal (visible in
                    // its depth) and is skipped for this connection.
                    error!(seq, topic = %topic, "record has an invalid MQTT topic; it stays in the journal");
                    self.window.skip(seq);
                }
                Err(HandOver::ChannelFull) => {
                    warn!(seq, "MQTT client channel full; retrying later");
                    // This record and those after it are read from the journal again.
                    self.read_ahead.clear();
                    self.maybe_more = true;
                    all = false;
                    break;
                }
            }
        }
        self.set_inflight_gauge();
        all
    }

    fn publish_status(&mut self, online: bool) {
        let payload = if online {
            match &self.cfg.status_source {
                Some(source) => (source.0)(),
                None => self.cfg.online_payload.clone(),
            }
        } else {
            self.cfg.offline_payload.clone()
        };
        match self
            .publisher
            .publish(&self.cfg.status_topic, payload, true)
        {
            Ok(()) => self.window.handed(Item::Status),
            Err(e) => warn!(?e, online, "could not hand over the status message"),
        }
    }

    fn begin_drain(&mut self) {
        let deadline = Instant::now() + self.cfg.shutdown_grace;
        self.drain_deadline = Some(deadline);
        info!(
            unacked = self.window.records(),
            "uplink shutting down; waiting for outstanding PUBACKs"
        );
        if self.connected {
            // The broker sends no will after a clean DISCONNECT: say "offline" ourselves.
            self.publish_status(false);
        }
    }

    /// The connection is gone (or dropped on purpose): salvage the PUBACKs rumqttc had already read,
    /// forget the session, and write the acks so the republish does not resend what the broker has.
    async fn lose_connection(&mut self, driver: &mut Driver) -> Result<(), UplinkError> {
        let now = std::time::Instant::now();
        for signal in driver.reset(self.cfg.inflight) {
            match signal {
                Signal::Sent(pkid) => {
                    if self.window.sent(pkid, now).is_err() {
                        // The correlation is being thrown away anyway; stop salvaging.
                        break;
                    }
                }
                Signal::Acked(pkid) => self.on_puback(pkid).await?,
                Signal::Refused { pkid, reason } => {
                    let _ = self.on_refused(pkid, &reason);
                }
                Signal::Message { topic, payload } => self.on_message(&topic, payload),
                Signal::ConnAck | Signal::Disconnected | Signal::Other => {}
            }
        }
        if self.connected {
            self.stats.connection_losses += 1;
        }
        if let Some(l) = &self.cfg.link_state {
            l.disconnected();
        }
        // A connection that held for a while was healthy whatever it carried (an idle gateway delivers
        // nothing): the next reconnect starts from the shortest delay.
        if self
            .connected_at
            .is_some_and(|t| t.elapsed() >= self.cfg.backoff_max)
        {
            self.attempt = 0;
        }
        self.connected_at = None;
        self.connected = false;
        self.set_connected_flag(false);
        self.reset_window();
        self.set_inflight_gauge();
        self.flush_acks().await
    }

    /// Sleeps before the next connection attempt. Returns `false` if shutdown came first.
    async fn back_off(&mut self) -> bool {
        let delay = backoff_delay(
            self.attempt,
            self.cfg.backoff_min,
            self.cfg.backoff_max,
            rand::random::<f64>(),
        );
        self.attempt = self.attempt.saturating_add(1);
        debug!(
            delay_ms = delay.as_millis() as u64,
            attempt = self.attempt,
            "uplink reconnect backoff"
        );
        let sleep = sleep(delay);
        tokio::pin!(sleep);
        self.check_in();
        let mut alive = self.heartbeat_ticker();
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                _ = self.shutdown.cancelled() => return false,
                _ = alive.tick() => self.check_in(),
            }
        }
    }

    /// Ticks at the watchdog's check-in period (never, without a heartbeat).
    fn heartbeat_ticker(&self) -> tokio::time::Interval {
        match &self.cfg.heartbeat {
            Some(h) => h.ticker(),
            // An hour: the branch is inert without a heartbeat.
            None => tokio::time::interval_at(
                Instant::now() + Duration::from_secs(3600),
                Duration::from_secs(3600),
            ),
        }
    }

    fn check_in(&self) {
        if let Some(h) = &self.cfg.heartbeat {
            h.check_in();
        }
    }

    /// Starts writing the PUBACKed seqs to the journal in the background, unless a write is already
    /// running (what comes in meanwhile goes in the next one).
    fn start_ack_job(&mut self) {
        if self.ack_job.is_some() || self.to_ack.is_empty() {
            return;
        }
        self.ack_due = None;
        let mut seqs = std::mem::take(&mut self.to_ack);
        seqs.sort_unstable();
        seqs.dedup();
        self.spawn_ack_job(seqs, false);
    }

    /// Starts the `fdatasync` of acks written without one — those `ack_sync_after` old, or all of them
    /// (`all`: at exit) — unless an ack job is running.
    fn start_sync_job(&mut self, all: bool) {
        if self.ack_job.is_some() {
            return;
        }
        self.sync_due = None;
        self.spawn_ack_job(Vec::new(), all);
    }

    /// Acks `seqs` (without `fdatasync`), or with none, syncs the acks written so (`all`, or once due).
    fn spawn_ack_job(&mut self, seqs: Vec<u64>, all: bool) {
        let batch = seqs.clone();
        let journal = Arc::clone(&self.journal);
        let sync_after = self.cfg.ack_sync_after;
        let handle = tokio::task::spawn_blocking(move || {
            let mut guard = journal
                .lock()
                .map_err(|_| UplinkError::JournalLockPoisoned)?;
            let result = if !batch.is_empty() {
                guard
                    .ack_unsynced(&batch)
                    .map(|()| guard.acks_due(sync_after))
            } else if all {
                guard.sync().map(|()| None)
            } else {
                guard.sync_acks_older_than(sync_after)
            };
            result.map_err(UplinkError::Journal)
        });
        self.ack_job = Some(AckJob { seqs, handle });
    }

    /// The background ack finished. A failure keeps its seqs for the next try (the records stay pending
    /// and would be resent after a reconnect: a duplicate, never a loss); a poisoned journal stops the
    /// uplink. Acks that piled up meanwhile are written next, at once if a batch is full.
    fn on_ack_done(
        &mut self,
        done: Result<Result<Option<std::time::Instant>, UplinkError>, tokio::task::JoinError>,
    ) -> Result<(), UplinkError> {
        let Some(job) = self.ack_job.take() else {
            return Ok(());
        };
        match done.map_err(|_| UplinkError::JournalTaskPanicked)? {
            // Acks left unsynced are synced when due, unless an append's fdatasync comes first (the
            // job then finds nothing to sync).
            Ok(due) => self.sync_due = due.map(Instant::from_std),
            Err(UplinkError::Journal(e)) if !matches!(e, JournalError::Poisoned { .. }) => {
                metrics::counter!("phg_journal_ack_errors_total").increment(1);
                warn!(error = %e, records = job.seqs.len(), "journal ack failed; will retry");
                self.to_ack.extend(job.seqs);
                self.ack_due = Some(Instant::now() + ACK_LINGER.max(Duration::from_millis(500)));
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if self.to_ack.len() >= ACK_BATCH {
            self.start_ack_job();
        } else if !self.to_ack.is_empty() && self.ack_due.is_none() {
            self.ack_due = Some(Instant::now() + ACK_LINGER);
        }
        Ok(())
    }

    /// Writes every PUBACKed seq to the journal and waits for it (before a republish, and at exit).
    async fn flush_acks(&mut self) -> Result<(), UplinkError> {
        for _ in 0..2 {
            // The job already running, then one for what is left.
            if self.ack_job.is_none() {
                self.start_ack_job();
            }
            self.wait_for_ack_job().await?;
        }
        Ok(())
    }

    /// Waits for the running ack job, if any, and takes its outcome.
    async fn wait_for_ack_job(&mut self) -> Result<(), UplinkError> {
        let Some(job) = self.ack_job.as_mut() else {
            return Ok(());
        };
        let done = (&mut job.handle).await;
        self.on_ack_done(done)
    }

    fn set_inflight_gauge(&self) {
        metrics::gauge!("phg_inflight").set(self.window.records() as f64);
    }

    /// Acks what came back, says goodbye if still connected, and reports.
    async fn finish(&mut self, driver: &mut Driver) -> Result<UplinkStats, UplinkError> {
        if self.connected && self.publisher.disconnect() {
            // Drive the loop until the DISCONNECT is written (or the connection fails, or time is up);
            // PUBACKs that still arrive meanwhile are acked like any other.
            let until = Instant::now() + DISCONNECT_WAIT;
            loop {
                match tokio::time::timeout_at(until, driver.poll()).await {
                    Ok(Ok(Signal::Acked(pkid))) => self.on_puback(pkid).await?,
                    Ok(Ok(Signal::Sent(pkid))) => {
                        let _ = self.window.sent(pkid, std::time::Instant::now());
                    }
                    Ok(Ok(Signal::Disconnected)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                }
            }
        }
        self.flush_acks().await?;
        // At exit the acks are made durable: a clean stop resends nothing.
        self.start_sync_job(true);
        self.wait_for_ack_job().await?;
        self.sync_due = None;
        self.connected = false;
        self.set_connected_flag(false);
        self.stats.unacked_at_exit = self.window.records() as u64;
        if self.stats.unacked_at_exit > 0 {
            warn!(
                unacked = self.stats.unacked_at_exit,
                "uplink stopping with records not PUBACKed; they stay in the journal"
            );
        }
        info!(
            delivered = self.stats.delivered,
            connections = self.stats.connections,
            "uplink stopped"
        );
        Ok(self.stats.clone())
    }
}
