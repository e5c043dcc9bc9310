//! The service: the MQTT consumer and the tasks beside it.
//!
//! ```text
//! broker ──$share QoS1──▶ event loop ──▶ (bounded channel) ──▶ storer: one transaction per batch ──▶ PUBACKs
//!                                                                      │ readings, engine state, alerts, outbox
//! clock (window rules every window_interval; deadlines at their second) ┤
//! outbox deliverers: webhook (HMAC), MQTT alerts topic ◀──────────────┘
//! API (axum): readings, alerts, acknowledgement
//! ```
//!
//! **A PUBACK only after the commit.** The client runs with `manual_acks`; the storer acknowledges the
//! messages of a batch after [`Store::ingest`] returned `Ok`. If storing fails (database down), the batch
//! is retried with backoff and nothing is acknowledged; if the process dies, the broker redelivers the
//! unacknowledged messages (the session is persistent: `clean_session = false` with a stable client id),
//! and idempotency by reading id makes the redelivery harmless.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::evaluate::{Evaluator, Sink};
use crate::now_ms;
use crate::outbox::{backoff, run_mqtt, run_webhook};
use crate::store::{AnyStore, Channel, Inbound, Store, StoreError, Stored};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The API's listening socket.
    #[error("api: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A patient's stored settings were rejected.
    #[error("patient settings: {0}")]
    Settings(String),
}

/// A started service.
#[derive(Debug)]
pub struct Running {
    token: CancellationToken,
    tasks: JoinSet<()>,
    store: AnyStore,
    evaluator: Arc<Evaluator>,
    api_addr: Option<SocketAddr>,
}

impl Running {
    /// The store (tests and benches read it).
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The evaluator.
    pub fn evaluator(&self) -> &Arc<Evaluator> {
        &self.evaluator
    }

    /// Where the API listens (the bound port when the config said port 0).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Stops every task and waits for them (unacknowledged messages are redelivered by the broker;
    /// claimed outbox rows are claimed again after their lease).
    pub async fn stop(mut self) {
        self.token.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Loads the stored patients' settings into the evaluator. Settings rejected by the guard-rails are
/// reported and skipped (the patient is evaluated with the profile defaults), never silently applied.
async fn load_patients(store: &AnyStore, ev: &Evaluator) -> Result<(), StoreError> {
    for json in store.patients().await? {
        match serde_json::from_str(&json) {
            Ok(p) => {
                if let Err(e) = ev.set_patient(p) {
                    // The guard-rail's message names the patient: kept out of WARN (privacy rule).
                    tracing::warn!(
                        "stored patient settings rejected; that patient is evaluated with the profile defaults"
                    );
                    tracing::debug!(error = %e, "stored patient settings rejected");
                }
            }
            Err(e) => tracing::warn!(error = %e, "stored patient settings unreadable"),
        }
    }
    Ok(())
}

/// Starts the service: opens the database, stores the configured patients' settings, and spawns the
/// consumer, the storer, the ticker, the outbox deliverers and the API.
///
/// # Errors
/// [`RunError`] when the database cannot be opened or the API cannot listen.
pub async fn start(cfg: Config) -> Result<Running, RunError> {
    let store = AnyStore::open_with(&cfg.database_url, cfg.database_ca_pem.as_deref()).await?;
    let mut sinks = vec![Sink::Mqtt];
    if cfg.webhook.is_some() {
        sinks.push(Sink::Webhook);
    }
    let ev = Arc::new(Evaluator::new(cfg.rules.clone(), sinks).with_notify_from(cfg.notify_from));
    for p in &cfg.patients {
        let json = serde_json::to_string(p).map_err(|e| RunError::Settings(e.to_string()))?;
        store.put_patient(&p.patient, &json, now_ms()).await?;
    }
    load_patients(&store, &ev).await?;
    let token = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let api_addr = match (cfg.api_listen, cfg.api_token.clone()) {
        (Some(addr), Some(api_token)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| RunError::Listen { addr, source })?;
            let app = crate::api::router(
                store.clone(),
                Arc::clone(&ev),
                cfg.instance.clone(),
                api_token,
            );
            let t = token.clone();
            tasks.spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(t.cancelled_owned());
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "api stopped");
                }
            });
            Some(bound)
        }
        // Config::parse requires a token whenever the API listens.
        _ => None,
    };

    // Consumer + storer.
    let mut opts = cfg.mqtt.options(cfg.mqtt.client_id.clone());
    opts.set_manual_acks(true);
    opts.set_clean_session(false);
    opts.set_inflight(cfg.mqtt.inflight);
    let (client, eventloop) = AsyncClient::new(opts, usize::from(cfg.mqtt.inflight).max(64));
    let (tx, rx) = mpsc::channel::<Publish>(cfg.mqtt.max_batch.max(16) * 2);
    // Committed messages go back to the consumer to be acknowledged (see `consume`); unbounded, but
    // never more than the messages received and not yet acknowledged.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Publish>();
    tasks.spawn(consume(
        client,
        eventloop,
        cfg.mqtt.filters(),
        (tx, ack_rx),
        token.clone(),
    ));
    tasks.spawn(storer(
        ack_tx,
        rx,
        store.clone(),
        Arc::clone(&ev),
        cfg.instance.clone(),
        (cfg.mqtt.max_batch, cfg.mqtt.max_message_size),
        token.clone(),
    ));

    // Time-based rules, deadlines and settings refresh.
    tasks.spawn(clock(
        store.clone(),
        Arc::clone(&ev),
        cfg.window_interval,
        cfg.digest_interval,
        token.clone(),
    ));

    // Outbox deliverers.
    tasks.spawn(run_mqtt(
        store.clone(),
        cfg.mqtt.clone(),
        cfg.instance.clone(),
        cfg.lease,
        cfg.poll,
        token.clone(),
    ));
    if let Some(w) = cfg.webhook.clone() {
        tasks.spawn(run_webhook(
            store.clone(),
            w,
            cfg.instance.clone(),
            cfg.lease,
            cfg.poll,
            token.clone(),
        ));
    }
    tracing::info!(
        instance = %cfg.instance,
        backend = store.backend(),
        broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
        api = ?api_addr,
        "ingest started"
    );
    Ok(Running {
        token,
        tasks,
        store,
        evaluator: ev,
        api_addr,
    })
}

/// How often the clock looks at the database's earliest deadline even when nothing woke it: a deadline
/// set by another instance (which then died) is run within this long of its time.
const DEADLINE_RECHECK: Duration = Duration::from_secs(15);

/// The clock: window rules (and a settings refresh) every `every`, the first at once; deadlines
/// (confirmation timeouts, unacknowledged escalation) at their second (issue 11 item 13).
///
/// It sleeps until the earliest of: the next window tick, the earliest deadline stored in the database
/// (whichever instance set it), [`DEADLINE_RECHECK`] from now. An evaluation on this instance that sets
/// an earlier deadline wakes it ([`Evaluator::deadline_set`]). When a deadline's time comes it runs the
/// deadlines of every patient due ([`Store::deadlines`]); running them twice (two instances) changes
/// nothing (deterministic event ids).
async fn clock(
    store: AnyStore,
    ev: Arc<Evaluator>,
    every: Duration,
    digest_every: Option<Duration>,
    token: CancellationToken,
) {
    use tokio::time::Instant;
    let mut window_at = Instant::now();
    // After a failed or fruitless pass, not again within a second (a state that cannot be read would
    // otherwise stay due and spin).
    let mut not_before = Instant::now();
    loop {
        let now_s = now_ms() / 1000;
        let hint = ev.take_deadline_hint();
        let stored = match store.next_deadline().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading the next deadline failed");
                None
            }
        };
        let next = match (hint, stored) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline_at = next.map(|d| {
            let wait = Duration::from_secs(u64::try_from(d.saturating_sub(now_s)).unwrap_or(0));
            Instant::now()
                .checked_add(wait)
                .unwrap_or(window_at)
                .max(not_before)
        });
        let recheck_at = Instant::now() + DEADLINE_RECHECK;
        let at = [Some(window_at), deadline_at, Some(recheck_at)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(window_at);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep_until(at) => {}
            // A new deadline on this instance: look again.
            _ = ev.deadline_set() => continue,
        }
        let now = Instant::now();
        if now >= window_at {
            window_at = now + every;
            if let Err(e) = load_patients(&store, &ev).await {
                tracing::warn!(error = %e, "patient settings refresh failed");
            }
            // The window pass runs the deadlines too.
            match store.tick(Arc::clone(&ev), now_ms() / 1000).await {
                Ok(n) => tracing::info!(alert_events = n, "time-based rules evaluated"),
                Err(e) => tracing::warn!(error = %e, "time-based rules failed"),
            }
            if let Some(d) = digest_every {
                digest(&store, &ev, d).await;
            }
        } else if deadline_at.is_some_and(|d| now >= d) {
            match store.deadlines(Arc::clone(&ev), now_ms() / 1000).await {
                Ok(n) => tracing::info!(alert_events = n, "alert deadlines run"),
                Err(e) => tracing::warn!(error = %e, "alert deadlines failed"),
            }
            not_before = now + Duration::from_secs(1);
        }
    }
}

/// Writes the digests of the last completed period (idempotent: each pass after the period ends tries,
/// the first to commit writes them). Alerts below [`Evaluator::notify_from`] reach the care team only
/// this way (CLINICAL.md §4.1: INFO "shown in weekly report"; issue 11 item 14).
async fn digest(store: &AnyStore, ev: &Evaluator, every: Duration) {
    let now = now_ms();
    let every_s = i64::try_from(every.as_secs()).unwrap_or(i64::MAX);
    let (from, to) = crate::evaluate::last_digest_period(now / 1000, every_s);
    match store
        .digest(from, to, ev.notify_from(), ev.sinks().to_vec(), now)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(digests = n, "alert digests written"),
        Err(e) => tracing::warn!(error = %e, "alert digests failed"),
    }
}

/// Runs until `shutdown` completes.
///
/// # Errors
/// As [`start`].
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let running = start(cfg).await?;
    // systemd (`Type=notify`; nothing without NOTIFY_SOCKET): ready once the database is open and the
    // consumer runs. The watchdog pings come from a task on the same runtime, so a wedged runtime (every
    // worker stuck) stops them; ingest has no per-task liveness registry as the gateway does.
    notify_systemd(sd_notify::NotifyState::Ready);
    let pinger = sd_notify::watchdog_enabled().map(|interval| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                notify_systemd(sd_notify::NotifyState::Watchdog);
            }
        })
    });
    shutdown.await;
    notify_systemd(sd_notify::NotifyState::Stopping);
    if let Some(p) = pinger {
        p.abort();
    }
    tracing::info!("ingest stopping");
    running.stop().await;
    Ok(())
}

fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Polls the MQTT event loop: (re)subscribes at each connection, forwards publishes to the storer and
/// queues the acknowledgements of what the storer committed.
///
/// This task is the only one that touches the client's request queue, and it never waits on it: rumqttc
/// drains that queue only inside `eventloop.poll()`, so a storer awaiting `client.ack` on a full queue while
/// this task awaits room in the storer's channel was a deadlock — found by the thousand-gateway load bench
/// (`tests/benches/load.rs`): under a burst ingest stopped polling, the broker dropped it for a missed
/// keep-alive and nothing more was stored. Now a publish waiting for room in the storer's channel is held
/// here (one at a time, backpressure to the broker), and acknowledgements go into the request queue with
/// `try_ack`, the rest kept in order until a poll has made room.
async fn consume(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    filters: [String; 3],
    (tx, mut acks_rx): (mpsc::Sender<Publish>, mpsc::UnboundedReceiver<Publish>),
    token: CancellationToken,
) {
    let mut failures = 0i32;
    // The configured packet limit, and whether it is raised to let one oversized message in.
    let limit = eventloop.mqtt_options.max_packet_size();
    let mut raised = false;
    // A publish the storer has no room for yet; while one waits, the event loop is not polled.
    let mut waiting: Option<Publish> = None;
    // Committed messages whose PUBACK is not in the request queue yet (it was full).
    let mut acks: std::collections::VecDeque<Publish> = std::collections::VecDeque::new();
    loop {
        while let Some(p) = acks.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            acks.pop_front();
        }
        let ev = tokio::select! {
            _ = token.cancelled() => break,
            a = acks_rx.recv() => {
                match a {
                    Some(p) => acks.push_back(p),
                    // The storer has ended.
                    None => break,
                }
                continue;
            }
            permit = tx.reserve(), if waiting.is_some() => {
                match (permit, waiting.take()) {
                    (Ok(permit), Some(p)) => permit.send(p),
                    _ => break,
                }
                continue;
            }
            ev = eventloop.poll(), if waiting.is_none() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                for f in &filters {
                    // `try_`: this task is the one that drains the request queue.
                    if let Err(e) = client.try_subscribe(f.as_str(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, filter = %f, "subscribe failed");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if raised {
                    // Back to the configured limit from the next connection on.
                    eventloop.mqtt_options.set_max_packet_size(limit, limit);
                    raised = false;
                }
                // Held when the storer is behind: backpressure to the broker.
                match tx.try_send(p) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(p)) => waiting = Some(p),
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                tracing::debug!(codes = ?s.return_codes, "subscribed");
            }
            Ok(_) => {}
            // A packet larger than the limit: rumqttc drops the connection on its fixed header, before
            // the message can be read or acknowledged, and the broker redelivers it first on the next
            // connection — the loop of issue 11 defect 1. Announcing a limit (MQTT 5's Maximum Packet
            // Size, §3.1.2.11.4) would make the broker discard such a message without a trace, so ingest
            // copes instead: reconnect once with room for exactly this packet, so the storer records it in
            // bad_messages and acknowledges it (docs/ingest.md).
            Err(rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                rumqttc::Error::PayloadSizeLimitExceeded(len),
            ))) => {
                let room = len.saturating_add(8).min(crate::config::MQTT_MAX_PACKET);
                tracing::warn!(
                    bytes = len,
                    limit,
                    "a message larger than mqtt.max_message_size arrived: reading it once to record \
                     and acknowledge it (set the broker's message_size_limit to match)"
                );
                eventloop.mqtt_options.set_max_packet_size(room, limit);
                raised = true;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let d = backoff(
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                    failures,
                );
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "MQTT connection failed");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

fn channel_of(topic: &str) -> Channel {
    if topic.ends_with("/events") {
        Channel::Events
    } else if topic.ends_with("/symptoms") {
        Channel::Symptoms
    } else {
        Channel::Readings
    }
}

/// Stores batches; hands each batch's messages to the consumer to acknowledge after its commit.
async fn storer(
    acks: mpsc::UnboundedSender<Publish>,
    mut rx: mpsc::Receiver<Publish>,
    store: AnyStore,
    ev: Arc<Evaluator>,
    instance: String,
    (max_batch, max_len): (usize, usize),
    token: CancellationToken,
) {
    let mut batch: Vec<Publish> = Vec::with_capacity(max_batch);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            n = rx.recv_many(&mut batch, max_batch) => if n == 0 { return },
        }
        let inbound: Vec<Inbound> = batch
            .iter()
            .map(|p| Inbound {
                topic: p.topic.clone(),
                channel: channel_of(&p.topic),
                payload: p.payload.to_vec(),
                max_len: Some(max_len),
            })
            .collect();
        let mut failures = 0i32;
        let results = loop {
            match store
                .ingest(inbound.clone(), Arc::clone(&ev), &instance, now_ms())
                .await
            {
                Ok(r) => break r,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let d = backoff(
                        Duration::from_millis(200),
                        Duration::from_secs(30),
                        failures,
                    );
                    tracing::error!(error = %e, messages = inbound.len(), retry_in_ms = d.as_millis() as u64,
                        "storing failed; messages stay unacknowledged");
                    tokio::select! {
                        // Not acknowledged: the broker redelivers them.
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        };
        let (mut new, mut dup, mut bad, mut alerts, mut rejected) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        for r in &results {
            match r {
                Stored::New { alerts: a } => {
                    new += 1;
                    alerts += a;
                }
                Stored::Duplicate => dup += 1,
                Stored::Rejected(reason) => {
                    rejected += 1;
                    // The reason names the check and the field, never a value.
                    tracing::warn!(reason = %reason, "reading or symptom report rejected: stored, not evaluated");
                }
                Stored::Event => {}
                Stored::Bad(error) => {
                    bad += 1;
                    // The error names what is wrong, never a value.
                    tracing::warn!(error = %error, "message kept in bad_messages");
                }
            }
        }
        tracing::debug!(
            new,
            duplicates = dup,
            rejected,
            bad,
            alert_events = alerts,
            "batch stored"
        );
        // Acknowledged by the consumer, which owns the request queue (see `consume`).
        for p in batch.drain(..) {
            if acks.send(p).is_err() {
                // The consumer has ended (shutdown): not acknowledged, the broker redelivers.
                return;
            }
        }
    }
}
