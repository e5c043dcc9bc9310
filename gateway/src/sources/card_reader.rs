//! The kiosk card reader: the companion board (`firmware`) on a serial port, speaking the link in
//! `protocol::link` (postcard frames, CRC-16, COBS, acknowledged and retransmitted).
//!
//! # What it does
//!
//! - Opens the port (`/dev/ttyACM0`, 115 200 baud by default) and keeps it open. When the board is
//!   unplugged the read fails; the port is reopened every [`Config::reopen_every`] until it is back. A
//!   streak of failed opens is logged once (WARN) and counted, not logged every second.
//! - Turns the board's messages into [`Event`]s on a bounded channel: `Hello` (board start or reader
//!   recovery), `CardPresented` (a tap: the UID, kept in memory only), `Fault` (the reader stopped
//!   answering), `Unplugged`. Heartbeats only keep the link counted.
//! - Sends `Show` ([`CardReader::show`]) and a `Ping` every [`Config::ping_every`] (the first one on
//!   open, which also starts the board's duplicate filter afresh).
//! - Counts the link: frames good and bad, retransmissions, frames given up ([`CardReader::counters`],
//!   and as Prometheus counters `phg_card_link_*_total`).
//! - Keeps the board's state for the staff page ([`CardReader::status`]): port open, when a frame was
//!   last heard (the board answers every ping, so a silent board is seen within seconds even while its
//!   port stays open), whether its reader works and the last fault.
//!
//! Turning a tap into a check-in is the kiosk's (`crate::kiosk::state::card_reader_task` maps a keyed
//! hash of the UID to a patient). A UID identifies a patient's card: it is never logged, at any level.
//!
//! # Design
//!
//! All protocol state lives in [`protocol::link::Endpoint`] (bytes in, frames out, time passed in); this
//! module only moves bytes between it and the port, as STYLE.md §7 asks.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::link::{
    BoardMessage, Counters, GatewayEndpoint, GatewayMessage, Hello, Indication, MAX_WIRE,
    ReaderFault, Timing, Uid,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where the board is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Config {
    /// The serial device (a USB CDC-ACM board appears as `/dev/ttyACM0`; a stable
    /// `/dev/serial/by-id/…` path survives replugging into another port).
    pub path: PathBuf,
    /// Baud rate; the firmware uses 115 200 (a USB CDC-ACM link ignores it).
    pub baud: u32,
    /// How often to ping the board.
    pub ping_every: Duration,
    /// How often to try to reopen a port that is gone.
    pub reopen_every: Duration,
    /// Retransmission timing of the gateway's frames.
    pub timing: Timing,
}

impl Config {
    /// The defaults for a board at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            baud: 115_200,
            ping_every: Duration::from_secs(5),
            reopen_every: Duration::from_secs(1),
            timing: Timing::default(),
        }
    }
}

/// What the card reader reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The board started (or its reader recovered): its firmware, id and whether the reader works.
    Hello(Hello),
    /// A card was tapped (once per presentation). The UID's `Debug` shows only its length.
    CardPresented(Uid),
    /// The board's card reader stopped working.
    Fault(ReaderFault),
    /// The serial port went away (the board was unplugged or reset its USB).
    Unplugged,
    /// The serial port could not be opened: the first failure of a streak only (why, for people).
    OpenFailed(String),
}

/// The running card reader: send it `Show`s, read its counters and its state.
#[derive(Debug, Clone)]
pub struct CardReader {
    shows: mpsc::Sender<Indication>,
    counters: Arc<Mutex<Counters>>,
    status: Arc<Mutex<BoardStatus>>,
    ping_every: Duration,
}

/// The board as last seen: no card UID, no patient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoardStatus {
    /// The serial port is open.
    pub port_open: bool,
    /// When the last good frame (any message, acknowledgements and heartbeats included) arrived.
    pub last_heard: Option<Instant>,
    /// Whether the board's card reader works, as its last `Hello` or `Fault` said; `None` before the
    /// first `Hello`.
    pub reader_ok: Option<bool>,
    /// The last fault the board reported, kept after a recovery (staff see what happened).
    pub last_fault: Option<ReaderFault>,
}

/// A board not heard for this many ping intervals is shown as not answering.
const SILENT_AFTER_PINGS: u32 = 3;

impl CardReader {
    /// Asks the board to show `indication`. Returns `false` if the card-reader task has stopped.
    pub async fn show(&self, indication: Indication) -> bool {
        self.shows.send(indication).await.is_ok()
    }

    /// The link's counters, summed over every time the port was open.
    pub fn counters(&self) -> Counters {
        // A poisoned lock only means a panic elsewhere mid-update: the counters are still readable.
        *self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The board's state now.
    pub fn status(&self) -> BoardStatus {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the board answers: its port is open and a frame came within a few ping intervals (it
    /// acknowledges every ping).
    pub fn answering(&self, now: Instant) -> bool {
        let status = self.status();
        status.port_open
            && status.last_heard.is_some_and(|t| {
                now.saturating_duration_since(t) <= self.ping_every * SILENT_AFTER_PINGS
            })
    }
}

/// Starts the card reader; it runs until `shutdown`. Events go to `events` (a full channel holds the
/// link back: taps are never dropped).
pub fn spawn(
    config: Config,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) -> (CardReader, tokio::task::JoinHandle<()>) {
    describe_metrics();
    let (shows_tx, shows_rx) = mpsc::channel(8);
    let counters = Arc::new(Mutex::new(Counters::default()));
    let status = Arc::new(Mutex::new(BoardStatus::default()));
    let ping_every = config.ping_every;
    let task = Task {
        config,
        events,
        shows: shows_rx,
        counters: counters.clone(),
        status: status.clone(),
        exported: Counters::default(),
    };
    let handle = tokio::spawn(task.run(shutdown));
    (
        CardReader {
            shows: shows_tx,
            counters,
            status,
            ping_every,
        },
        handle,
    )
}

/// The card reader's metrics, described once for the Prometheus endpoint (its `# HELP` lines).
fn describe_metrics() {
    metrics::describe_counter!(
        "phg_card_reader_unplugged_total",
        "Times the card reader's serial port went away (unplugged, or the board reset)."
    );
    metrics::describe_counter!(
        "phg_card_reader_device_errors_total",
        "Streaks of failures to open the card reader's serial port (one per streak)."
    );
    metrics::describe_counter!(
        "phg_card_reader_faults_total",
        "Card reader (MFRC522) faults the board reported."
    );
    metrics::describe_counter!(
        "phg_card_link_frames_good_total",
        "Link frames from the board that decoded."
    );
    metrics::describe_counter!(
        "phg_card_link_frames_bad_total",
        "Link frames from the board dropped as corrupt, truncated, oversized or undecodable."
    );
    metrics::describe_counter!(
        "phg_card_link_retransmissions_total",
        "Frames the gateway sent to the board again for want of an acknowledgement."
    );
    metrics::describe_counter!(
        "phg_card_link_given_up_total",
        "Frames to the board given up after the last retransmission."
    );
    metrics::describe_counter!(
        "phg_card_link_duplicates_total",
        "Repeated frames from the board, acknowledged again and acted on once."
    );
}

struct Task {
    config: Config,
    events: mpsc::Sender<Event>,
    shows: mpsc::Receiver<Indication>,
    counters: Arc<Mutex<Counters>>,
    status: Arc<Mutex<BoardStatus>>,
    /// What has been added to the Prometheus counters so far.
    exported: Counters,
}

/// Why a session with an open port ended.
enum End {
    Shutdown,
    Lost,
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match tokio_serial::SerialStream::open(&tokio_serial::new(
                self.config.path.to_string_lossy(),
                self.config.baud,
            )) {
                Ok(port) => {
                    failing = false;
                    tracing::info!(path = %self.config.path.display(), "card reader port open");
                    self.update_status(|s| s.port_open = true);
                    let end = self.session(port, &shutdown).await;
                    self.update_status(|s| s.port_open = false);
                    match end {
                        End::Shutdown => return,
                        End::Lost => {
                            tracing::warn!(path = %self.config.path.display(), "card reader port lost; reopening");
                            metrics::counter!("phg_card_reader_unplugged_total").increment(1);
                            if self.events.send(Event::Unplugged).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Err(error) => {
                    // Once per streak: a kiosk without its board would otherwise log every second.
                    if !failing {
                        failing = true;
                        tracing::warn!(path = %self.config.path.display(), %error, "card reader port unavailable");
                        metrics::counter!("phg_card_reader_device_errors_total").increment(1);
                        if self
                            .events
                            .send(Event::OpenFailed(error.to_string()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.reopen_every) => {}
            }
        }
    }

    /// Runs the link over one open port until it fails or shutdown.
    async fn session(
        &mut self,
        mut port: tokio_serial::SerialStream,
        shutdown: &CancellationToken,
    ) -> End {
        let start = Instant::now();
        let mut link = GatewayEndpoint::new(self.config.timing);
        link.send(GatewayMessage::Ping);
        let mut ping = tokio::time::interval(self.config.ping_every);
        ping.tick().await; // the first tick is immediate: the Ping above is it
        // Wakes the loop for retransmissions; a frame takes ~1 ms at 115 200 baud, the retry ~250 ms.
        let mut retry = tokio::time::interval(Duration::from_millis(20));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let base = self.counters();
        let mut buf = [0u8; 256];
        let mut wire = [0u8; MAX_WIRE];
        loop {
            let now_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            while let Some(n) = link.transmit(now_ms, &mut wire) {
                if port.write_all(wire.get(..n).unwrap_or(&[])).await.is_err() {
                    self.publish(base, link.counters());
                    return End::Lost;
                }
            }
            self.publish(base, link.counters());
            // Every branch is cancel-safe: an interrupted read has consumed nothing.
            tokio::select! {
                () = shutdown.cancelled() => return End::Shutdown,
                read = port.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return End::Lost,
                        Ok(n) => n,
                    };
                    for &byte in buf.get(..n).unwrap_or(&[]) {
                        let good_before = link.counters().frames_good;
                        let message = link.receive(byte);
                        // Any good frame, acknowledgements and repeats included, shows the board
                        // answers; noted before the message is passed on, so whoever acts on it sees it.
                        if link.counters().frames_good != good_before {
                            self.update_status(|s| s.last_heard = Some(Instant::now()));
                        }
                        if let Some(message) = message
                            && !self.deliver(message).await {
                                return End::Shutdown;
                            }
                    }
                }
                // Once every CardReader handle is gone, `None` disables this branch; taps still flow.
                Some(indication) = self.shows.recv() => {
                    tracing::debug!(?indication, "card reader: show");
                    link.send(GatewayMessage::Show(indication));
                }
                _ = ping.tick() => {
                    link.send(GatewayMessage::Ping);
                }
                _ = retry.tick() => {}
            }
        }
    }

    /// Passes a board message on; `false` if nobody listens any more.
    async fn deliver(&mut self, message: BoardMessage) -> bool {
        self.update_status(|s| match message {
            BoardMessage::Hello(hello) => s.reader_ok = Some(hello.reader_ok),
            BoardMessage::Fault(fault) => {
                s.reader_ok = Some(false);
                s.last_fault = Some(fault);
            }
            BoardMessage::CardPresented(_) | BoardMessage::Heartbeat | BoardMessage::Ack => {}
        });
        let event = match message {
            BoardMessage::Hello(hello) => {
                tracing::info!(
                    board_id = hello.board_id,
                    firmware = %format_args!("{}.{}.{}", hello.firmware.major, hello.firmware.minor, hello.firmware.patch),
                    reader_ok = hello.reader_ok,
                    "card reader board says hello"
                );
                Event::Hello(hello)
            }
            BoardMessage::CardPresented(uid) => {
                // The UID identifies a patient's card: only its size is logged.
                tracing::debug!(uid_len = uid.as_bytes().len(), "card presented");
                Event::CardPresented(uid)
            }
            BoardMessage::Fault(fault) => {
                tracing::warn!(?fault, "card reader fault on the board");
                metrics::counter!("phg_card_reader_faults_total").increment(1);
                Event::Fault(fault)
            }
            BoardMessage::Heartbeat | BoardMessage::Ack => return true,
        };
        self.events.send(event).await.is_ok()
    }

    fn counters(&self) -> Counters {
        *self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_status(&self, change: impl FnOnce(&mut BoardStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Stores `base + session` as the totals and adds what is new to the Prometheus counters.
    fn publish(&mut self, base: Counters, session: Counters) {
        let total = base.plus(session);
        *self.counters.lock().unwrap_or_else(|e| e.into_inner()) = total;
        let delta = |new: u32, old: u32| u64::from(new.wrapping_sub(old));
        let e = self.exported;
        metrics::counter!("phg_card_link_frames_good_total")
            .increment(delta(total.frames_good, e.frames_good));
        metrics::counter!("phg_card_link_frames_bad_total")
            .increment(delta(total.frames_bad(), e.frames_bad()));
        metrics::counter!("phg_card_link_retransmissions_total")
            .increment(delta(total.retransmissions, e.retransmissions));
        metrics::counter!("phg_card_link_given_up_total")
            .increment(delta(total.given_up, e.given_up));
        metrics::counter!("phg_card_link_duplicates_total")
            .increment(delta(total.duplicates, e.duplicates));
        self.exported = total;
    }
}
